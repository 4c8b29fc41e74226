// Faster drop-ins for two hot spots of @ton/core in a long-running devnet.
//
// Profiling the devnet under load showed most CPU outside the TVM: cell hashing
// through @ton/crypto's pure-JS SHA-256 (jssha over hex strings), BitBuilder.writeBits
// copying bit by bit and a bitwise CRC-32C on every BOC. They are replaced here by
// equivalent code (node's native SHA-256; a byte copy when both sides are
// byte-aligned; a table-driven CRC-32C), checked against the originals at startup:
// results are bit-for-bit the same. IMAGO_DEVNET_NO_FASTPATHS=1 turns them off.
import { createHash, randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

function patchSha256() {
    const mod = require('@ton/crypto/dist/primitives/sha256.js');
    const original = mod.sha256_sync;
    const fast = (source) =>
        createHash('sha256')
            .update(typeof source === 'string' ? Buffer.from(source, 'utf-8') : source)
            .digest();
    for (const probe of ['', 'abc', randomBytes(200)]) {
        if (!original(probe).equals(fast(probe))) throw new Error('sha256 fast path mismatch');
    }
    mod.sha256_sync = fast;
}

function patchWriteBits() {
    const { BitBuilder } = require('@ton/core/dist/boc/BitBuilder.js');
    const { BitString } = require('@ton/core/dist/boc/BitString.js');
    const original = BitBuilder.prototype.writeBits;
    function writeBits(src) {
        const len = src._length;
        if (
            (src._offset & 7) === 0 &&
            (this._length & 7) === 0 &&
            Buffer.isBuffer(src._data) &&
            this._length + len <= this._buffer.length * 8
        ) {
            const whole = len >> 3;
            const start = src._offset >> 3;
            src._data.copy(this._buffer, this._length >> 3, start, start + whole);
            this._length += whole * 8;
            for (let i = whole * 8; i < len; i++) this.writeBit(src.at(i));
            return;
        }
        original.call(this, src);
    }
    // check against the original on random aligned and unaligned inputs
    for (let k = 0; k < 50; k++) {
        const data = randomBytes(40);
        const offset = k % 3 === 0 ? 8 * (k % 4) : k % 16;
        const length = (k * 37) % 250;
        const bits = new BitString(data, offset, length);
        const prefix = k % 2 === 0 ? 0 : 8;
        const a = new BitBuilder(1023);
        const b = new BitBuilder(1023);
        for (let i = 0; i < prefix; i++) {
            a.writeBit(i % 3 === 0);
            b.writeBit(i % 3 === 0);
        }
        original.call(a, bits);
        writeBits.call(b, bits);
        if (!a.build().equals(b.build())) throw new Error('writeBits fast path mismatch');
    }
    BitBuilder.prototype.writeBits = writeBits;
}

function patchCrc32c() {
    const mod = require('@ton/core/dist/utils/crc32c.js');
    const original = mod.crc32c;
    const table = new Int32Array(256);
    for (let n = 0; n < 256; n++) {
        let c = n;
        for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
        table[n] = c;
    }
    function crc32c(source) {
        let crc = -1;
        for (let n = 0; n < source.length; n++) crc = table[(crc ^ source[n]) & 0xff] ^ (crc >>> 8);
        const res = Buffer.alloc(4);
        res.writeInt32LE(crc ^ -1);
        return res;
    }
    for (const probe of [Buffer.alloc(0), Buffer.from('123456789'), randomBytes(1000)]) {
        if (!original(probe).equals(crc32c(probe))) throw new Error('crc32c fast path mismatch');
    }
    mod.crc32c = crc32c;
}

if (process.env.IMAGO_DEVNET_NO_FASTPATHS !== '1') {
    patchSha256();
    patchWriteBits();
    patchCrc32c();
}
