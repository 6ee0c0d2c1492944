"""ttspec_ros: early-exit RevCol classification that specializes to what the robot sees.

The ROS-free core (models, cascade, specialization, test-time training, data, experiments,
CLI) never imports rclpy; the nodes in ``ttspec_ros.nodes`` are thin rclpy wrappers.
"""

# The generated message modules (ttspec_ros.msg) are installed by CMake next to an installed
# copy of this package. Extending __path__ lets a source checkout that comes first on
# sys.path still find them (the catkin devel-space pattern).
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
