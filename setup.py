"""simfluence_jax: training data attribution by simulation, in JAX."""
import setuptools

setuptools.setup(
    name="simfluence_jax",
    version="0.1.0",
    description="Simfluence (Guu et al. 2023) and prior TDA methods as training-run simulators, in JAX/Flax.",
    # The gin configs live at the checkout's top level (gin_configs/) and ship inside the
    # package as simfluence_jax/gin_configs, where cli.gin_setup finds them when installed.
    packages=setuptools.find_packages(include=["simfluence_jax", "simfluence_jax.*"])
    + ["simfluence_jax.gin_configs"],
    package_dir={"simfluence_jax.gin_configs": "gin_configs"},
    package_data={"simfluence_jax.gin_configs": ["*.gin", "*/*.gin"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.26",
        "scipy>=1.11",
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "absl-py>=2.1",
        "gin-config==0.5.0",
        "seqio>=0.0.19",
        "countryinfo>=1.0",
        "clu>=0.0.12",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "pyarrow>=15",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3.5"],
        "xm": ["xmanager"],
    },
)
