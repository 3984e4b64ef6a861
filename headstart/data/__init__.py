"""Image folders: scanning them into a manifest, splitting it, and the built-in data sets."""
