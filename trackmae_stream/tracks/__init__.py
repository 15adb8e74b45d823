"""Tracks computed once and reused: the track store, the window sampling and the remap of stored tracks to each
clip's crop, ahead-of-time filling (`python -m trackmae_stream.tracks precompute`), and tracking on other ranks."""
