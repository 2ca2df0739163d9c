"""Reading instances back from the tile store's label layers (the tests' view of what was stored)."""

from __future__ import annotations

import numpy as np

from nucleiseg.core.masks import Instance


def window_instances_from_labels(labels: np.ndarray) -> list[Instance]:
    """The instances stored in a window's label layers (training never needs them; the tests check the tile store with them)."""
    from scipy import ndimage

    out = []
    for layer in labels:
        for label, box in enumerate(ndimage.find_objects(layer), start=1):
            if box is not None:
                mask = layer[box] == label
                out.append((label, Instance(np.ascontiguousarray(mask), box[1].start, box[0].start)))
    return [inst for _, inst in sorted(out, key=lambda pair: pair[0])]
