"""Sample device programs: what a small device does to reach IoT Hub through iot-gateway.

- ``amqp_device``: python-qpid-proton; CBS put-token, telemetry at-least-once,
  one cloud-to-device command accepted.
- ``mqtt_device``: paho-mqtt; SAS CONNECT, telemetry with a property bag, twin
  GET and reported PATCH, a direct method answered.

Each runs on its own (``python -m gateway.samples.amqp_device --help``) and is
written to be read: the device keeps the real hub host name in its token,
CBS audience and MQTT username; only its TCP endpoint points at the gateway.
"""
