"""pip install of the ROS-free core (models, training, experiments, the ``ttspec`` CLI).

On a ROS 2 machine colcon builds this repository with CMake (package.xml: ament_cmake), which
also generates the messages and installs the nodes; this file is for machines without ROS.
Pinned versions for the development environment live in requirements.txt.
"""

from setuptools import find_packages, setup

setup(
    name="ttspec_ros",
    version="0.1.0",
    description="Early-exit RevCol classification with test-time specialization and training",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ttspec_ros", "ttspec_ros.*"]),
    package_data={"ttspec_ros": ["weights/*.json", "weights/*.safetensors"]},
    # Bags hold our label messages: the ROS-free bag tools read their definition from
    # <prefix>/share/ttspec_ros/msg, where colcon installs it too (bags._msg_dirs).
    data_files=[("share/ttspec_ros/msg", ["msg/LabelStamped.msg"])],
    install_requires=[
        "numpy",
        "torch>=2.0",  # torch.device as a context (checkpoint loading builds on "meta")
        "safetensors",
        "opencv-python-headless",
        "matplotlib",
        "PyYAML",
    ],
    extras_require={"bags": ["rosbags"], "onnx": ["onnx", "onnxruntime"], "test": ["pytest"]},
    entry_points={"console_scripts": ["ttspec = ttspec_ros.cli:main"]},
)
