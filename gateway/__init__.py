"""iot-gateway: a transparent AMQP 1.0 / MQTT gateway to Azure IoT Hub."""

__version__ = "0.1.0"
