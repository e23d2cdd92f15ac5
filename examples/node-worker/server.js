#!/usr/bin/env node
// A systemd-style baton worker on Node.js's `http` module, with no dependencies.
//
// It serves every inherited listener (`listen({fd: 3})`, ... with LISTEN_FDS, checking that
// LISTEN_PID is its own pid), and answers a readiness probe on BATON_PROBE_ADDRESS (a Unix
// socket path or host:port that baton gives each worker), since Node cannot sd_notify.
//
// On SIGTERM (baton's drain signal) it stops accepting, answers the next request on each
// kept-alive connection with `Connection: close`, closes connections still idle after a grace
// period, and exits 0 once every connection is closed.
'use strict';

const http = require('http');

const pid = process.pid;
const generation = process.env.BATON_GENERATION || '0';
const IDLE_GRACE_MS = 2000;

if (process.env.LISTEN_PID !== String(pid)) {
  console.error(`LISTEN_PID=${process.env.LISTEN_PID} is not this process (${pid}): refusing the descriptors`);
  process.exit(1);
}
const count = parseInt(process.env.LISTEN_FDS || '0', 10);
if (!(count > 0)) {
  console.error('no listeners: LISTEN_FDS is not set');
  process.exit(1);
}

let draining = false;
function handler(req, res) {
  const body = `hello from node pid ${pid}, generation ${generation}\n`;
  const headers = {
    'content-type': 'text/plain; charset=utf-8',
    'content-length': Buffer.byteLength(body),
    'x-baton-generation': generation,
  };
  if (draining) headers.connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
}

// One server per inherited descriptor: an http.Server listens once.
const servers = [];
let listening = 0;
for (let i = 0; i < count; i++) {
  const server = http.createServer(handler);
  server.keepAliveTimeout = 5000;
  server.listen({ fd: 3 + i }, () => {
    listening += 1;
    if (listening === count) startProbe();
  });
  servers.push(server);
}

// The readiness probe: answered only once every listener serves.
let probe = null;
function startProbe() {
  const address = process.env.BATON_PROBE_ADDRESS;
  console.error(`node worker pid ${pid} generation ${generation} serving ${count} listener(s)`);
  if (!address) return;
  probe = http.createServer((req, res) => {
    res.writeHead(draining ? 503 : 200, { 'content-type': 'text/plain' });
    res.end(draining ? 'draining\n' : 'ready\n');
  });
  if (address.includes('/')) {
    require('fs').rmSync(address, { force: true }); // left over by an earlier worker
    probe.listen(address);
  } else {
    const at = address.lastIndexOf(':');
    probe.listen({ host: address.slice(0, at), port: Number(address.slice(at + 1)) });
  }
}

process.on('SIGTERM', () => {
  if (draining) return;
  draining = true;
  let open = servers.length;
  for (const server of servers) {
    // net.Server's close stops accepting without closing idle kept-alive connections at once
    // (http.Server's close would: the race that loses a client's next request).
    require('net').Server.prototype.close.call(server, () => {
      open -= 1;
      if (open === 0) {
        if (probe) probe.close();
        console.error(`node worker pid ${pid} drained: exiting`);
        process.exit(0);
      }
    });
    setTimeout(() => server.closeIdleConnections(), IDLE_GRACE_MS).unref();
  }
});
