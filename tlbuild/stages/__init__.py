"""The stages of a build: one module each, exporting one Stage as STAGE; order.py lists them
in order. Nothing is imported here, so a device command that needs one stage (bench, engines)
does not load the others (export and train need PyTorch)."""
