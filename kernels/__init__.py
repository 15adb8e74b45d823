"""Triton kernels and their torch reference twins (installed as `trackmae_stream.kernels`)."""
