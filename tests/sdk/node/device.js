// A device (or module) on the Azure IoT Node.js device SDK, driven by tests/sdk.
//
//   node device.js SPEC      SPEC: JSON, see tests/sdk/harness.py (device_spec) plus
//     transport: "amqp" | "mqtt"
//     d2c: [{body (base64), messageId, correlationId, contentType, contentEncoding, app: {}}]
//     c2d: number of cloud-to-device messages to settle; each as its message id says
//          (complete-*, reject-*, abandon-*; an abandoned one is completed when it comes back)
//     twin: {reported: {...}, desired_key: "k"}  get the twin, patch reported, then wait for
//          the desired patch that sets desired_key
//     method: "name"           answer one direct method call (status 200, echoes the payload)
//
// Prints one JSON object per line for each step done ("event": open, sent, c2d, c2d-done,
// twin, reported, twin-ready, desired, method-ready, method, done; "error" on failure) and,
// after the last step, waits for {"command": "close"} on stdin.
'use strict';

const fs = require('fs');
const readline = require('readline');
const { Client, ModuleClient, Message } = require('azure-iot-device');

const spec = JSON.parse(process.argv[2]);

function emit(event, fields) {
  // Synchronous, so nothing is lost when the script exits right after.
  fs.writeSync(1, JSON.stringify(Object.assign({ event: event }, fields || {})) + '\n');
}

function transportCtor() {
  if (spec.transport === 'amqp') return require('azure-iot-device-amqp').Amqp;
  if (spec.transport === 'mqtt') return require('azure-iot-device-mqtt').Mqtt;
  throw new Error('unknown transport ' + spec.transport);
}

const commands = [];
let commandWaiter = null;
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  commands.push(JSON.parse(line));
  if (commandWaiter) commandWaiter();
});

function waitCommand(name) {
  return new Promise((resolve) => {
    const check = () => {
      const i = commands.findIndex((c) => c.command === name);
      if (i >= 0) {
        commandWaiter = null;
        resolve(commands.splice(i, 1)[0]);
      }
    };
    commandWaiter = check;
    check();
  });
}

function appProperties(message) {
  const out = {};
  const props = message.properties;
  for (let i = 0; i < props.count(); i++) {
    const item = props.getItem(i);
    out[item.key] = item.value;
  }
  return out;
}

function receiveC2d(client, count) {
  return new Promise((resolve, reject) => {
    const seen = new Set();
    let settled = 0;
    client.on('message', (msg) => {
      const id = String(msg.messageId);
      let action = 'complete';
      if (spec.transport === 'amqp') {
        if (id.startsWith('reject')) action = 'reject';
        else if (id.startsWith('abandon') && !seen.has(id)) action = 'abandon';
      }
      seen.add(id);
      const done = (err) => {
        if (err) return reject(err);
        emit('c2d', {
          messageId: id,
          action: action,
          body: Buffer.from(msg.data).toString('base64'),
          correlationId: msg.correlationId === undefined ? null : String(msg.correlationId),
          contentType: msg.contentType || null,
          app: appProperties(msg),
        });
        if (action !== 'abandon') settled += 1;
        if (settled === count) resolve();
      };
      client[action](msg, done);
    });
  });
}

async function main() {
  const Transport = transportCtor();
  const factory = spec.module_id ? ModuleClient : Client;
  const client = factory.fromConnectionString(spec.connection_string, Transport);
  client.on('error', (err) => emit('error', { error: 'client error: ' + (err && err.message) }));
  await client.setOptions({ ca: fs.readFileSync(spec.ca_file, 'utf8') });
  await client.open();
  // The api-version the SDK puts in its twin and method links' attach properties.
  emit('open', { apiVersion: require('azure-iot-common').endpoint.apiVersion });

  const messages = spec.d2c || [];
  for (let index = 0; index < messages.length; index++) {
    const m = messages[index];
    const msg = new Message(Buffer.from(m.body, 'base64'));
    if (m.messageId) msg.messageId = m.messageId;
    if (m.correlationId) msg.correlationId = m.correlationId;
    if (m.contentType) msg.contentType = m.contentType;
    if (m.contentEncoding) msg.contentEncoding = m.contentEncoding;
    for (const [k, v] of Object.entries(m.app || {})) msg.properties.add(k, v);
    const result = await client.sendEvent(msg);
    emit('sent', { index: index, result: result && result.constructor ? result.constructor.name : null });
  }

  if (spec.c2d) {
    await receiveC2d(client, spec.c2d);
    emit('c2d-done');
  }

  if (spec.twin) {
    const twin = await client.getTwin();
    emit('twin', { desired: twin.properties.desired, reported: twin.properties.reported });
    await new Promise((resolve, reject) =>
      twin.properties.reported.update(spec.twin.reported, (err) => (err ? reject(err) : resolve())));
    emit('reported');
    const desired = new Promise((resolve) => {
      twin.on('properties.desired', (patch) => {
        // The first call carries the twin's current desired properties; wait for the patch.
        if (patch && patch[spec.twin.desired_key] !== undefined) resolve(patch);
      });
    });
    emit('twin-ready');
    const patch = await desired;
    emit('desired', { patch: patch });
  }

  if (spec.method) {
    const called = new Promise((resolve, reject) => {
      // ModuleClient names it onMethod, Client onDeviceMethod.
      const register = spec.module_id ? client.onMethod.bind(client) : client.onDeviceMethod.bind(client);
      register(spec.method, (request, response) => {
        const payload = request.payload;
        response.send(200, { echo: payload, method: request.methodName }, (err) => {
          if (err) return reject(err);
          emit('method', { payload: payload, requestId: request.requestId });
          resolve();
        });
      });
    });
    emit('method-ready');
    await called;
  }

  emit('settled');
  await waitCommand('close');
  await client.close();
  emit('done');
}

main().then(
  () => process.exit(0),
  (err) => {
    emit('error', { error: String((err && err.stack) || err) });
    process.exit(1);
  });
