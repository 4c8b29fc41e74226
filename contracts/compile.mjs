// Compiles the four Imago contracts with @ton/tolk-js and writes contracts/build/<name>.json.
// Deterministic: same sources + same compiler -> byte-identical JSON.
// Usage: node contracts/compile.mjs [--check]   (--check: compare with the committed files, exit 1 on drift)
import { runTolkCompiler, getTolkCompilerVersion } from "@ton/tolk-js";
import { Cell } from "@ton/core";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const CONTRACTS = ["registry", "provider", "vault", "escrow"];

export async function compileOne(name) {
  const entry = `${name}/${name}-contract.tolk`;
  const res = await runTolkCompiler({
    entrypointFileName: entry,
    fsReadCallback: (p) => fs.readFileSync(path.join(HERE, p), "utf-8"),
  });
  if (res.status !== "ok") throw new Error(`${name}: ${res.message}`);
  const code = Cell.fromBoc(Buffer.from(res.codeBoc64, "base64"))[0];
  const cells = new Set();
  let bits = 0;
  const walk = (c) => {
    const h = c.hash().toString("hex");
    if (cells.has(h)) return;
    cells.add(h);
    bits += c.bits.length;
    c.refs.forEach(walk);
  };
  walk(code);
  return {
    name,
    tolkVersion: res.tolkVersion,
    codeBoc64: res.codeBoc64,
    codeHashHex: res.codeHashHex,
    codeBits: bits,
    codeCells: cells.size,
    sources: res.sourcesSnapshot.map((s) => s.filename).sort(),
  };
}

async function main() {
  const check = process.argv.includes("--check");
  const version = await getTolkCompilerVersion();
  let drift = false;
  for (const name of CONTRACTS) {
    const out = await compileOne(name);
    const text = JSON.stringify(out, null, 2) + "\n";
    const file = path.join(HERE, "build", `${name}.json`);
    if (check) {
      const old = fs.existsSync(file) ? fs.readFileSync(file, "utf-8") : "";
      if (old !== text) {
        drift = true;
        console.error(`DRIFT ${name}: committed build differs from a fresh compile`);
      }
    } else {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      fs.writeFileSync(file, text);
    }
    console.log(`${name}: tolk ${version} hash ${out.codeHashHex} ${out.codeBits} bits ${out.codeCells} cells`);
  }
  if (drift) process.exit(1);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  main().catch((e) => {
    console.error(String(e.message || e));
    process.exit(1);
  });
}
