// Persistence of the devnet: accounts and bounded transaction history in one
// JSON file, written debounced and atomically (write to a temp file, then rename).
import fs from 'node:fs';
import path from 'node:path';

import { Address, Cell, loadShardAccount } from '@ton/core';

const FORMAT = 1;
const DEBOUNCE_MS = 500;

export class StateStore {
    constructor(file) {
        this.file = file;
        this.dn = null;
        this.timer = null;
        this.writing = null;
        this.dirtyHistory = new Set();
        this.historyJson = new Map(); // raw address -> serialized history list
        this.accounts = new Map(); // raw address -> ShardAccount BOC (base64)
    }

    attach(dn) {
        this.dn = dn;
    }

    markDirty(raw) {
        this.dirtyHistory.add(raw);
    }

    schedule() {
        if (this.file === null || this.timer !== null) return;
        this.timer = setTimeout(() => {
            this.timer = null;
            this.flush().catch((e) => process.stderr.write(`state save failed: ${e}\n`));
        }, DEBOUNCE_MS);
    }

    serialize() {
        const dn = this.dn;
        const contracts = dn.bc.storage.contracts;
        for (const raw of this.dirtyHistory) {
            const sc = contracts.get(Address.parseRaw(raw).toString());
            if (sc !== undefined) this.accounts.set(raw, sc._account);
            const list = dn.history.get(raw) ?? [];
            const rows = list.map((e) => {
                if (e.boc === null) e.boc = e.tx ? e.tx.raw.toBoc().toString('base64') : e.json.data;
                return [e.lt.toString(), e.hash.toString('base64'), e.boc];
            });
            this.historyJson.set(raw, JSON.stringify(rows));
        }
        this.dirtyHistory.clear();
        const accounts = Object.fromEntries(this.accounts);
        const head = JSON.stringify({
            format: FORMAT,
            saved_at: Math.floor(Date.now() / 1000),
            lt: dn.bc.lt.toString(),
            seqno: dn.seqno,
            pinned_now: dn.pinnedNow,
            high_water: dn.highWater,
            tx_count: dn.txCount,
            accounts,
        });
        const parts = [];
        for (const [raw, json] of this.historyJson) parts.push(`${JSON.stringify(raw)}:${json}`);
        return `${head.slice(0, -1)},"history":{${parts.join(',')}}}`;
    }

    /** Save now (waits for a write in flight first). */
    async flush() {
        if (this.file === null) return;
        if (this.timer !== null) {
            clearTimeout(this.timer);
            this.timer = null;
        }
        while (this.writing !== null) await this.writing;
        const text = this.serialize();
        const tmp = `${this.file}.tmp-${process.pid}`;
        this.writing = (async () => {
            await fs.promises.writeFile(tmp, text);
            await fs.promises.rename(tmp, this.file);
        })();
        try {
            await this.writing;
        } finally {
            this.writing = null;
        }
    }

    /** Load the state file if there is one; returns whether it did. */
    async load() {
        if (this.file === null) return false;
        fs.mkdirSync(path.dirname(path.resolve(this.file)), { recursive: true });
        let text;
        try {
            text = fs.readFileSync(this.file, 'utf8');
        } catch (e) {
            if (e.code === 'ENOENT') return false;
            throw e;
        }
        const state = JSON.parse(text);
        if (state.format !== FORMAT) throw new Error(`unsupported state format ${state.format}`);
        const dn = this.dn;
        for (const [raw, b64] of Object.entries(state.accounts)) {
            const account = loadShardAccount(Cell.fromBase64(b64).beginParse());
            await dn.bc.setShardAccount(Address.parseRaw(raw), account);
            this.accounts.set(raw, b64);
        }
        dn.bc.currentLt = BigInt(state.lt);
        dn.seqno = state.seqno;
        dn.pinnedNow = state.pinned_now ?? null;
        dn.highWater = state.high_water ?? 0;
        dn.txCount = state.tx_count ?? 0;
        for (const [raw, rows] of Object.entries(state.history ?? {})) {
            dn.history.set(
                raw,
                rows.map(([lt, hash, boc]) => ({ lt: BigInt(lt), hash: Buffer.from(hash, 'base64'), boc, tx: null })),
            );
            this.historyJson.set(raw, JSON.stringify(rows));
        }
        return true;
    }
}
