"""trackmae_stream: streaming TrackMAE pretraining.

`kernels/` sits at the repository top level but installs as `trackmae_stream.kernels`: a bare `kernels` import
name would collide with an unrelated PyPI package.
"""
from setuptools import find_packages, setup

setup(
    name="trackmae_stream",
    version="0.1.0",
    description="Streaming TrackMAE pretraining: DALI decode, in-process CoTracker3, Triton target kernels, ViT",
    python_requires=">=3.10",
    packages=find_packages(include=["trackmae_stream", "trackmae_stream.*"]) + ["trackmae_stream.kernels"],
    package_dir={"trackmae_stream.kernels": "kernels"},
    package_data={"trackmae_stream": ["configs/*.yaml"]},
    install_requires=[
        # torch>=2.10 covers the GPU image (2.11+cu130) and what timm's torchvision pulls here (2.15).
        "torch>=2.10",
        "timm>=1.0",
        "einops>=0.8",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        # Decoders: OpenCV is the fastest CPU decoder measured here; PyAV also encodes the VP9 synthetic set.
        "opencv-python-headless>=4.9",
        "av>=12",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "xformers": ["xformers==0.0.35"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "scipy>=1.11"],
    },
)
