"""Foundations every stage shares: errors, config, file IO, masks, window geometry, COCO records, runtime."""
