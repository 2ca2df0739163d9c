"""The CodaLab submission: the answer JSON of RLE masks for the test images (the export stage)."""
