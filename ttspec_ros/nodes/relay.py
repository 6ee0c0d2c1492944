"""Transport floor for ``ttspec bench-ros``: the pipeline's hops with nothing in between.

``--role camera`` answers every ``image_raw`` Image with a zero frame of the model input's
size on ``frames``; ``--role classifier`` answers every frame with a CascadePrediction. Same
topics, message types, QoS, header passing and executor as the real nodes, but no decoding,
preprocessing or model, so publish -> prediction through these two processes is what rclpy and
DDS alone cost on this machine. Not a node users run.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image

from ttspec_ros import topics
from ttspec_ros.image_codec import encode_frame
from ttspec_ros.msg import CascadePrediction
from ttspec_ros.nodes import exit_process, load_input_spec, qos, run_node
from ttspec_ros.preprocess import input_shape

ROLES = (topics.CAMERA_NODE, topics.CLASSIFIER_NODE)


class RelayNode(Node):
    def __init__(self, role: str, model: str = "") -> None:
        super().__init__(f"{role}_relay")
        if role == topics.CAMERA_NODE:
            shape = input_shape(load_input_spec(model))
            self._frame = encode_frame(np.zeros(shape, np.float32))
            self._pub = self.create_publisher(Image, topics.FRAMES, qos(topics.QOS_FRAMES))
            self.create_subscription(Image, topics.IMAGE_RAW, self._to_frame,
                                     qos(topics.QOS_SENSOR))
        else:
            self._pub = self.create_publisher(CascadePrediction, topics.PREDICTIONS,
                                              qos(topics.QOS_RELIABLE))
            self.create_subscription(Image, topics.FRAMES, self._to_prediction,
                                     qos(topics.QOS_FRAMES))

    def _to_frame(self, msg: Image) -> None:
        self._pub.publish(Image(header=msg.header, **self._frame))

    def _to_prediction(self, msg: Image) -> None:
        self._pub.publish(CascadePrediction(header=msg.header, num_exits=1))


def main(args: list[str] | None = None) -> int:
    argv = sys.argv[1:] if args is None else list(args)
    ros_args = argv[argv.index("--ros-args"):] if "--ros-args" in argv else []
    own = argv[: len(argv) - len(ros_args)]
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--role", required=True, choices=ROLES)
    parser.add_argument("--model", default="", help="model whose input size frames have")
    opts = parser.parse_args(own)
    return run_node(lambda: RelayNode(opts.role, opts.model), [sys.argv[0], *ros_args])


if __name__ == "__main__":
    exit_process(main())
