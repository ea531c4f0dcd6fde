"""The image file extensions tlbuild reads: one list for training folders and `classify`."""

# Pillow decodes all of them; a GIF gives its first frame. Kept apart from the decoder so the
# command line can show it without importing Pillow.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
