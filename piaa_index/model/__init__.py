"""The model: open_clip loading and the one-pass encoder, the text tower, weights on disk, the library's model record, the shipped ShapesWorld assets."""
