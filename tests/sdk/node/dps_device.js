// A device on the Node.js SDK: provision with azure-iot-provisioning-device over its AMQP or
// MQTT transport, then send telemetry to the assigned hub (same protocol).
//
// Run by tests/sdk: `node dps_device.js SPEC` (NODE_EXTRA_CA_CERTS = the gateway's CA), SPEC a
// JSON object: "transport" (amqp | mqtt), "provisioning_host" (the gateway's address: the SDK
// dials 5671 or 8883 there), "id_scope", "registration_id", "key", "payload" (optional),
// "gateway" (the gateway's address for the hub connection), "hub_transport" (amqp | mqtt, default:
// "transport"), "messages" (bodies, UTF-8).
// Prints one JSON line per step: registered, sent (per message), done; or error.
'use strict';

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Client, Message } = require('azure-iot-device');

function emit(event, fields) {
  process.stdout.write(JSON.stringify(Object.assign({ event }, fields || {})) + '\n');
}

async function main(spec) {
  const amqp = spec.transport === 'amqp';
  const provTransport = amqp
    ? new (require('azure-iot-provisioning-device-amqp').Amqp)()
    : new (require('azure-iot-provisioning-device-mqtt').Mqtt)();
  const hubAmqp = (spec.hub_transport || spec.transport) === 'amqp';
  const hubProtocol = hubAmqp ? require('azure-iot-device-amqp').Amqp : require('azure-iot-device-mqtt').Mqtt;
  const security = new SymmetricKeySecurityClient(spec.registration_id, spec.key);
  const client = ProvisioningDeviceClient.create(spec.provisioning_host, spec.id_scope, provTransport, security);
  if (spec.payload !== undefined && spec.payload !== null) {
    client.setProvisioningPayload(spec.payload);
  }
  const result = await client.register();
  emit('registered', { status: 'assigned', assigned_hub: result.assignedHub, device_id: result.deviceId,
                       payload: result.payload === undefined ? null : result.payload });
  const cs = `HostName=${result.assignedHub};DeviceId=${result.deviceId};` +
             `SharedAccessKey=${spec.key};GatewayHostName=${spec.gateway}`;
  const hub = Client.fromConnectionString(cs, hubProtocol);
  await hub.open();
  try {
    for (let i = 0; i < (spec.messages || []).length; i++) {
      const msg = new Message(spec.messages[i]);
      msg.messageId = `${spec.registration_id}-${i}`;
      await hub.sendEvent(msg);
      emit('sent', { index: i });
    }
  } finally {
    await hub.close();
  }
  emit('done');
}

main(JSON.parse(process.argv[2])).then(
  () => process.exit(0),
  (err) => { emit('error', { error: String(err && (err.stack || err)) }); process.exit(1); },
);
