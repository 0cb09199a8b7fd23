// Reference encoder for aha's tokenizer parity test and benchmark: @lenml/tokenizers, a port of
// Hugging Face's tokenizers to JavaScript (transformers.js).
//
// usage: node reference_encode.js NPM_DIR TOKENIZER_JSON CONFIG_JSON|- IN OUT [--bench]
//   IN: one input per line, hex-encoded bytes. Bytes are decoded as the WHATWG decoder does
//   (invalid sequences -> U+FFFD, a leading BOM kept).
//   OUT: one JSON object per input: {"p": ids without specials, "s": ids with add_special_tokens,
//   "t": hex of the text as decoded, "d": hex of decode(p), "n": hex of the text in NFC}.
//   --bench: encode each input once (OUT gets one id array per line), and print {"seconds",
//   "cpu_seconds" (all of node's threads), "bytes", "tokens"} for the encode loop alone on stdout.
"use strict";
const fs = require("fs");
const path = require("path");

const [npmDir, tokPath, cfgPath, inPath, outPath, mode] = process.argv.slice(2);
if (!outPath) {
  console.error("usage: node reference_encode.js NPM_DIR TOKENIZER_JSON CONFIG_JSON|- IN OUT [--bench]");
  process.exit(2);
}
const { TokenizerLoader } = require(path.join(npmDir, "node_modules", "@lenml", "tokenizers"));
const tokenizerJSON = JSON.parse(fs.readFileSync(tokPath, "utf8"));
const tokenizerConfig = cfgPath === "-" ? {} : JSON.parse(fs.readFileSync(cfgPath, "utf8"));
const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });

const decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
const encoder = new TextEncoder();
const hex = (s) => Buffer.from(encoder.encode(s)).toString("hex");
const lines = fs.readFileSync(inPath, "utf8").split("\n");
if (lines.length && lines[lines.length - 1] === "") lines.pop();
const texts = lines.map((l) => decoder.decode(Buffer.from(l, "hex")));

if (mode === "--bench") {
  let bytes = 0;
  for (const t of texts) bytes += encoder.encode(t).length;
  const ids = new Array(texts.length);
  const start = process.hrtime.bigint();
  const cpu0 = process.cpuUsage();
  for (let i = 0; i < texts.length; ++i) ids[i] = tok.encode(texts[i], { add_special_tokens: false });
  const cpu = process.cpuUsage(cpu0);
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const cpu_seconds = (cpu.user + cpu.system) / 1e6;
  let tokens = 0;
  for (const x of ids) tokens += x.length;
  fs.writeFileSync(outPath, ids.map((x) => JSON.stringify(x)).join("\n") + "\n");
  console.log(JSON.stringify({ seconds, cpu_seconds, bytes, tokens }));
} else {
  const out = [];
  for (const t of texts) {
    const p = tok.encode(t, { add_special_tokens: false });
    const s = tok.encode(t);
    const d = p.length ? tok.decode(p, { skip_special_tokens: false, clean_up_tokenization_spaces: false }) : "";
    out.push(JSON.stringify({ p, s, t: hex(t), d: hex(d), n: hex(t.normalize("NFC")) }));
  }
  fs.writeFileSync(outPath, out.join("\n") + "\n");
}
