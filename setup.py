"""Packaging for AIGIS; the version lives in aigis/_version.py."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "aigis" / "_version.py").read_text()
).group(1)

setup(
    name="aigis",
    version=VERSION,
    description="Aggregation of Independently Governed Information Sources: one brain for many plugins",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["aigis", "aigis.*"]),
    install_requires=[
        "pygit2>=1.11",
        "dill>=0.3.6",
        "multiprocess>=0.70.12",
        "sdnotify>=0.3.1",
        "jeepney>=0.8",
        # the core's TLS certificate for its TCP listener (made once, at first start)
        "cryptography>=38",
    ],
    extras_require={
        "systemd": ["systemd-python>=234"],
        # The optional HTTP listener ([aigis] http): /metrics and the status page.
        "metrics": ["prometheus_client>=0.16"],
        "dev": [
            "pytest>=7",
            "ruff>=0.4",
            "mypy>=1.8",
            "hypothesis>=6.90",
            "prometheus_client>=0.16",
            "selenium>=4.10",
        ],
    },
    entry_points={
        "console_scripts": [
            "aigis = aigis._daemon:main",
            "aigisctl = aigis._ctl:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
