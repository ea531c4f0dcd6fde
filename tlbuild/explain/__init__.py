"""Heat maps of what the network looks at (Grad-CAM): for the report and `tlbuild explain`."""
