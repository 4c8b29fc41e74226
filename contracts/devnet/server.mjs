// Imago devnet: a long-running TON emulator (real TVM via @ton/sandbox) behind a
// subset of the toncenter v2 HTTP API, plus devnet-only endpoints under /devnet/.
//
// Usage: node server.mjs [--port N] [--host H] [--state FILE] [--config slim|default]
// Prints one JSON line {"event":"ready","port":N,...} on stdout once it listens.
import './fastpaths.mjs';
import http from 'node:http';
import { parseArgs } from 'node:util';

import { Blockchain, GetMethodError, TimeError, EmulationError } from '@ton/sandbox';
import { Address, beginCell, Cell, Dictionary, loadMessage, loadTransaction, toNano } from '@ton/core';

import { ApiError, parseAddress, parseBoc, parseStack, stackToToncenter } from './codec.mjs';
import { txToToncenter, normalizedExtInHash, ZERO_HASH_B64, hashToB64 } from './codec.mjs';
import { StateStore } from './state.mjs';

const startedAt = process.hrtime.bigint();
const HISTORY_LIMIT = 1000;
const FAUCET_SEED = 'imago-devnet-faucet';
const FAUCET_BALANCE = toNano('1000000000');
const SHARD_ALL = '-9223372036854775808';
// The devnet's network global id (config param 19). Not mainnet's -239 nor testnet's -3:
// every signed object names its network, and a voucher signed on the devnet must not be
// valid on mainnet, where the same StateInit has the same address. Python:
// contracts.protocol.signed.DEVNET_GLOBAL_ID.
const DEVNET_GLOBAL_ID = -1000;

const { values: opts } = parseArgs({
    options: {
        port: { type: 'string', default: '8600' },
        host: { type: 'string', default: '127.0.0.1' },
        state: { type: 'string', default: '' },
        config: { type: 'string', default: 'slim' },
        'history-limit': { type: 'string', default: String(HISTORY_LIMIT) },
    },
});

/** A promise-chain mutex: every state change runs alone, in arrival order. */
class Mutex {
    #tail = Promise.resolve();
    run(fn) {
        const result = this.#tail.then(fn);
        this.#tail = result.catch(() => {});
        return result;
    }
}

class Devnet {
    constructor(blockchain, store, historyLimit) {
        this.bc = blockchain;
        this.store = store;
        this.historyLimit = historyLimit;
        this.mutex = new Mutex();
        this.history = new Map(); // raw address -> [{lt, hash, boc, tx?}] oldest first
        this.seqno = 1;
        this.pinnedNow = null;
        this.highWater = 0; // chain time never goes backwards, pinned or not
        this.faucet = null;
        this.txCount = 0;
    }

    /** Chain time: the pinned time or wall time, but never before an executed transaction. */
    now() {
        return Math.max(this.pinnedNow ?? Math.floor(Date.now() / 1000), this.highWater);
    }

    /** Execute a message and its whole chain; record every transaction. */
    async execute(message) {
        const now = this.now();
        this.bc.now = now;
        const txs = await this.runChain(message, now);
        if (txs.length > 0) this.highWater = Math.max(this.highWater, now);
        this.record(txs);
        return txs;
    }

    /**
     * The sandbox's queue (Blockchain.sendMessage) does the same plus events, parent
     * links and a full account parse per transaction that we never use; this loop
     * keeps only what the chain needs: one transaction per message, breadth first,
     * logical time advanced before each, internal out-messages queued.
     */
    async runChain(message, now) {
        const queue = [message instanceof Cell ? loadMessage(message.beginParse()) : message];
        const txs = [];
        while (queue.length > 0) {
            const msg = queue.shift();
            if (msg.info.type === 'external-out') continue;
            this.bc.increaseLt();
            const sc = await this.bc.getContract(msg.info.dest);
            let tx;
            try {
                tx = await sc.receiveMessage(msg, { now });
            } catch (e) {
                if (txs.length === 0) throw e; // the external message was not accepted
                process.stderr.write(`internal message not executed: ${e?.message ?? e}\n`);
                continue;
            }
            txs.push(tx);
            for (const key of tx.outMessages.keys().sort((a, b) => a - b)) {
                const out = tx.outMessages.get(key);
                if (out.info.type === 'internal') queue.push(out);
            }
        }
        return txs;
    }

    record(txs) {
        if (txs.length === 0) return;
        for (const tx of txs) {
            const raw = new Address(0, bigintTo32(tx.address)).toRawString();
            const entry = { lt: tx.lt, hash: tx.hash(), boc: null, tx };
            let list = this.history.get(raw);
            if (list === undefined) {
                list = [];
                this.history.set(raw, list);
            }
            list.push(entry);
            if (list.length > this.historyLimit) list.splice(0, list.length - this.historyLimit);
            this.store.markDirty(raw);
        }
        this.txCount += txs.length;
        this.seqno += 1;
        this.store.schedule();
    }

    async contract(address) {
        return this.bc.getContract(address);
    }

    blockId() {
        const seq = Buffer.alloc(32);
        seq.writeUInt32BE(this.seqno, 28);
        return {
            '@type': 'ton.blockIdExt',
            workchain: -1,
            shard: SHARD_ALL,
            seqno: this.seqno,
            root_hash: beginCell().storeBuffer(seq).endCell().hash().toString('base64'),
            file_hash: beginCell().storeBuffer(seq).storeUint(1, 8).endCell().hash().toString('base64'),
        };
    }
}

function configParams(config) {
    return Dictionary.loadDirect(Dictionary.Keys.Int(32), Dictionary.Values.Cell(), config);
}

/** The sandbox's config with the devnet's own global id (param 19). */
function devnetConfig(config) {
    const params = configParams(config);
    params.set(19, beginCell().storeInt(DEVNET_GLOBAL_ID, 32).endCell());
    return beginCell().storeDictDirect(params).endCell();
}

function bigintTo32(v) {
    return Buffer.from(v.toString(16).padStart(64, '0'), 'hex');
}

function lastTxId(sc) {
    const acc = sc.account;
    return {
        '@type': 'internal.transactionId',
        lt: acc.lastTransactionLt.toString(),
        hash: acc.lastTransactionLt === 0n ? ZERO_HASH_B64 : hashToB64(acc.lastTransactionHash),
    };
}

function accountStateName(sc) {
    const st = sc.accountState;
    if (st === undefined || st.type === 'uninit') return 'uninitialized';
    return st.type; // 'active' | 'frozen'
}

// ---------------------------------------------------------------- toncenter API

const api = {
    async getAddressInformation(dn, p) {
        const address = parseAddress(p.address);
        const sc = await dn.contract(address);
        const st = sc.accountState;
        let code = '';
        let data = '';
        let frozenHash = '';
        if (st?.type === 'active') {
            code = st.state.code ? st.state.code.toBoc().toString('base64') : '';
            data = st.state.data ? st.state.data.toBoc().toString('base64') : '';
        } else if (st?.type === 'frozen') {
            frozenHash = hashToB64(st.stateHash);
        }
        return {
            '@type': 'raw.fullAccountState',
            balance: sc.balance.toString(),
            extra_currencies: [],
            code,
            data,
            last_transaction_id: lastTxId(sc),
            block_id: dn.blockId(),
            frozen_hash: frozenHash,
            sync_utime: dn.now(),
            state: accountStateName(sc),
        };
    },

    // toncenter's getConfigParam: {config_id, seqno (ignored)} -> the param's cell.
    async getConfigParam(dn, p) {
        const id = Number(p.config_id);
        if (!Number.isInteger(id) || id < -2147483648 || id > 2147483647) throw new ApiError(400, 'config_id must be an int32');
        const param = configParams(dn.bc.config).get(id);
        if (param === undefined) throw new ApiError(404, `config param ${id} not found`);
        return {
            '@type': 'configInfo',
            config: { '@type': 'tvm.cell', bytes: param.toBoc().toString('base64') },
        };
    },

    async getAddressBalance(dn, p) {
        const sc = await dn.contract(parseAddress(p.address));
        return sc.balance.toString();
    },

    async getAddressState(dn, p) {
        const sc = await dn.contract(parseAddress(p.address));
        return accountStateName(sc);
    },

    async getWalletInformation(dn, p) {
        const address = parseAddress(p.address);
        const sc = await dn.contract(address);
        const res = {
            wallet: false,
            balance: sc.balance.toString(),
            extra_currencies: [],
            account_state: accountStateName(sc),
            last_transaction_id: lastTxId(sc),
        };
        if (res.account_state !== 'active') return res;
        for (const [method, field] of [['seqno', 'seqno'], ['get_subwallet_id', 'wallet_id']]) {
            try {
                const r = await dn.bc.runGetMethod(address, method, [], { now: dn.now() });
                if (r.stack[0]?.type === 'int') {
                    res[field] = Number(r.stack[0].value);
                    res.wallet = true;
                }
            } catch {
                // not a wallet (or not this getter)
            }
        }
        if (res.wallet) {
            const code = sc.accountState.state.code;
            res.wallet_type = WALLET_TYPES[code?.hash().toString('hex')] ?? 'unknown';
        }
        return res;
    },

    async runGetMethod(dn, p) {
        const address = parseAddress(p.address);
        if (p.method === undefined || p.method === null || p.method === '') {
            throw new ApiError(400, 'method is required');
        }
        let method = p.method;
        if (typeof method === 'string' && /^-?\d+$/.test(method)) method = Number(method);
        if (typeof method !== 'string' && !Number.isInteger(method)) {
            throw new ApiError(400, 'method must be a name or an integer id');
        }
        let stackIn = p.stack ?? [];
        if (typeof stackIn === 'string') {
            try {
                stackIn = JSON.parse(stackIn);
            } catch {
                throw new ApiError(400, 'stack must be a JSON array');
            }
        }
        const stack = parseStack(stackIn);
        const sc = await dn.contract(address);
        if (sc.accountState?.type !== 'active') {
            return { '@type': 'smc.runResult', gas_used: 0, stack: [], exit_code: -13, block_id: dn.blockId() };
        }
        try {
            const r = await dn.bc.runGetMethod(address, method, stack, { now: dn.now() });
            return {
                '@type': 'smc.runResult',
                gas_used: Number(r.gasUsed),
                stack: stackToToncenter(r.stack),
                exit_code: r.exitCode,
                block_id: dn.blockId(),
            };
        } catch (e) {
            if (e instanceof GetMethodError) {
                return {
                    '@type': 'smc.runResult',
                    gas_used: Number(e.gasUsed),
                    stack: [],
                    exit_code: e.exitCode,
                    block_id: dn.blockId(),
                };
            }
            throw e;
        }
    },

    async sendBoc(dn, p) {
        await sendExternal(dn, p);
        return { '@type': 'ok' };
    },

    async sendBocReturnHash(dn, p) {
        const { hash, hashNorm } = await sendExternal(dn, p);
        return { '@type': 'raw.extMessageInfo', hash, hash_norm: hashNorm };
    },

    async getTransactions(dn, p) {
        const address = parseAddress(p.address);
        const limit = p.limit === undefined ? 10 : intParam(p.limit, 'limit');
        if (limit < 1 || limit > 1000) throw new ApiError(416, 'limit must be in 1..1000');
        const list = dn.history.get(address.toRawString()) ?? [];
        let i = list.length - 1;
        if (p.lt !== undefined && p.lt !== null && p.lt !== '') {
            const lt = BigInt(intParam(p.lt, 'lt', true));
            while (i >= 0 && list[i].lt > lt) i -= 1;
            if (p.hash) {
                const want = decodeHash(p.hash);
                if (i < 0 || list[i].lt !== lt || !list[i].hash.equals(want)) {
                    throw new ApiError(404, 'LITE_SERVER_UNKNOWN: transaction not found');
                }
            }
        }
        const toLt = p.to_lt === undefined || p.to_lt === null || p.to_lt === '' ? 0n : BigInt(intParam(p.to_lt, 'to_lt', true));
        const out = [];
        for (; i >= 0 && out.length < limit; i -= 1) {
            const entry = list[i];
            if (toLt !== 0n && entry.lt <= toLt) break;
            out.push(txJson(entry));
        }
        return out;
    },

    async estimateFee(dn, p) {
        const address = parseAddress(p.address);
        const body = p.body ? parseBoc(p.body, 'body') : new Cell();
        const code = p.init_code ? parseBoc(p.init_code, 'init_code') : undefined;
        const data = p.init_data ? parseBoc(p.init_data, 'init_data') : undefined;
        const ignoreChksig = p.ignore_chksig === undefined ? true : truthy(p.ignore_chksig);
        const init = code || data ? { code, data } : undefined;
        const message = {
            info: { type: 'external-in', dest: address, importFee: 0n },
            init,
            body,
        };
        return dn.mutex.run(async () => {
            const sc = await dn.contract(address);
            const saved = sc.snapshot();
            const savedLt = dn.bc.lt;
            try {
                dn.bc.now = dn.now();
                const tx = await sc.receiveMessage(message, { ignoreChksig, now: dn.now() });
                const d = tx.description;
                const storage = d.storagePhase?.storageFeesCollected ?? 0n;
                const cp = d.computePhase;
                const gasFee = cp?.type === 'vm' ? cp.gasFees : 0n;
                const action = d.actionPhase?.totalFwdFees ?? 0n;
                const inFwd = tx.totalFees.coins - storage - gasFee - (d.actionPhase?.totalActionFees ?? 0n);
                return {
                    '@type': 'query.fees',
                    source_fees: {
                        '@type': 'fees',
                        in_fwd_fee: Number(inFwd > 0n ? inFwd : 0n),
                        storage_fee: Number(storage),
                        gas_fee: Number(gasFee),
                        fwd_fee: Number(action),
                    },
                    destination_fees: [],
                };
            } catch (e) {
                if (e instanceof EmulationError) {
                    throw new ApiError(400, `LITE_SERVER_UNKNOWN: cannot apply external message to current state : ${e.error}`, e.exitCode);
                }
                throw e;
            } finally {
                sc.loadFrom(saved);
                dn.bc.currentLt = savedLt;
            }
        });
    },

    async getMasterchainInfo(dn) {
        const last = dn.blockId();
        return {
            '@type': 'blocks.masterchainInfo',
            last,
            state_root_hash: last.root_hash,
            init: { ...last, seqno: 0 },
        };
    },
};

const WALLET_TYPES = {
    '20834b7b72b112147e1b2fb457b84e74d1a30f04f737d4f62a668e9552d2b72f': 'wallet v5 r1',
    'feb5ff6820e2ff0d9483e7e0d62c817d846789fb4ae580c878866d959dabd5c0': 'wallet v4 r2',
    '84dafa449f98a6987789ba232358072bc0f76dc4524002a5d0918b9a75d2d599': 'wallet v3 r2',
    'b61041a58a7980b946e8fb9e198e3c904d24799ffa36574ea4251c41a566f581': 'wallet v3 r1',
};

async function sendExternal(dn, p) {
    if (p.boc === undefined || p.boc === null || p.boc === '') throw new ApiError(400, 'boc is required');
    const cell = parseBoc(p.boc, 'boc');
    let msg;
    try {
        msg = loadMessage(cell.beginParse());
    } catch (e) {
        throw new ApiError(400, `cannot deserialize message: ${e.message}`);
    }
    if (msg.info.type !== 'external-in') throw new ApiError(400, 'only external inbound messages can be sent');
    const hash = cell.hash().toString('base64');
    const hashNorm = normalizedExtInHash(msg).toString('base64');
    await dn.mutex.run(async () => {
        try {
            await dn.execute(cell);
        } catch (e) {
            if (e instanceof EmulationError) {
                // as a liteserver words it, with the contract's exit code when it threw
                const code = e.exitCode !== undefined ? `\nexitcode=${e.exitCode}` : '';
                throw new ApiError(
                    500,
                    `LITE_SERVER_UNKNOWN: cannot apply external message to current state : External message was not accepted\n${e.error}${code}`,
                    e.exitCode,
                );
            }
            if (e instanceof TimeError) throw new ApiError(409, e.message);
            throw e;
        }
    });
    return { hash, hashNorm };
}

function txJson(entry) {
    if (entry.json === undefined) {
        if (entry.tx === undefined || entry.tx === null) {
            const cell = Cell.fromBase64(entry.boc);
            entry.tx = loadTransaction(cell.beginParse());
        }
        entry.json = txToToncenter(entry.tx, entry.hash);
        entry.tx = null; // the JSON is all we need from now on
    }
    return entry.json;
}


function intParam(v, name, allowBig = false) {
    const s = String(v);
    if (!/^-?\d+$/.test(s)) throw new ApiError(416, `${name} must be an integer`);
    return allowBig ? s : Number(s);
}

function decodeHash(h) {
    const s = String(h);
    let buf;
    if (/^[0-9a-fA-F]{64}$/.test(s)) buf = Buffer.from(s, 'hex');
    else buf = Buffer.from(s.replace(/-/g, '+').replace(/_/g, '/'), 'base64');
    if (buf.length !== 32) throw new ApiError(416, 'hash must be 32 bytes (base64 or hex)');
    return buf;
}

function truthy(v) {
    return v === true || v === 'true' || v === '1' || v === 1;
}

// ---------------------------------------------------------------- devnet-only API

const devApi = {
    async health(dn) {
        return {
            status: 'ok',
            seqno: dn.seqno,
            lt: dn.bc.lt.toString(),
            now: dn.now(),
            pinned: dn.pinnedNow !== null,
            transactions: dn.txCount,
            faucet: dn.faucet.address.toString({ testOnly: true }),
        };
    },

    async faucet(dn, p, method) {
        if (method !== 'POST') throw new ApiError(405, 'use POST');
        const address = parseAddress(p.address);
        let amount;
        try {
            amount = p.amount === undefined ? toNano('10') : BigInt(String(p.amount));
        } catch {
            throw new ApiError(400, 'amount must be an integer number of nanoTON');
        }
        if (amount <= 0n || amount > toNano('1000000')) throw new ApiError(400, 'amount must be in 1..10^15 nanoTON');
        const bounce = p.bounce === undefined ? false : truthy(p.bounce);
        const body = p.body ? parseBoc(p.body, 'body') : undefined;
        const txs = await dn.mutex.run(async () => {
            const contract = await dn.bc.getContract(dn.faucet.address);
            if (contract.balance < amount * 2n) contract.balance = FAUCET_BALANCE;
            dn.bc.now = dn.now();
            const transfer = dn.faucet.createTransfer({
                messages: [
                    {
                        info: { type: 'internal', ihrDisabled: true, bounce, bounced: false, dest: address, value: { coins: amount }, ihrFee: 0n, forwardFee: 0n, createdLt: 0n, createdAt: 0 },
                        body: body ?? new Cell(),
                    },
                ],
                sendMode: 3,
            });
            const ext = beginCell()
                .storeUint(0b10, 2)
                .storeUint(0, 2)
                .storeAddress(dn.faucet.address)
                .storeCoins(0)
                .storeBit(0)
                .storeBit(1)
                .storeRef(transfer)
                .endCell();
            return dn.execute(ext);
        });
        const dest = txs.find((t) => bigintTo32(t.address).equals(address.hash) && t.inMessage?.info.type === 'internal');
        const first = txs[0];
        return {
            hash: (dest ?? first).hash().toString('base64'),
            lt: (dest ?? first).lt.toString(),
            faucet_tx: { lt: first.lt.toString(), hash: first.hash().toString('base64') },
            transactions: txs.length,
            amount: amount.toString(),
        };
    },

    async clock(dn, p, method) {
        if (method === 'POST') {
            if (!('now' in p)) throw new ApiError(400, 'body must be {"now": unix_seconds} or {"now": null}');
            if (p.now === null) {
                dn.pinnedNow = null;
            } else {
                const n = Number(p.now);
                if (!Number.isInteger(n) || n < 0 || n > 2 ** 32 - 1) throw new ApiError(400, 'now must be a unix time in seconds');
                dn.pinnedNow = n;
            }
            dn.store.schedule();
        }
        // a pin before the last transaction's time is clamped: chain time is monotonic
        return { now: dn.now(), pinned: dn.pinnedNow !== null, requested: dn.pinnedNow };
    },

    // What the account's storage fees are charged on: the emulator's storage stat.
    async storage(dn, p) {
        const sc = await dn.contract(parseAddress(p.address));
        const info = sc.account.account?.storageStats; // undefined: no account
        return {
            cells: Number(info?.used.cells ?? 0),
            bits: Number(info?.used.bits ?? 0),
            last_paid: info?.lastPaid ?? 0,
            due_payment: (info?.duePayment ?? 0n).toString(),
        };
    },

    async flush(dn) {
        await dn.store.flush();
        return { saved: true };
    },
};

// ---------------------------------------------------------------- HTTP

function send(res, status, obj) {
    const body = JSON.stringify(obj);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
}

function readBody(req) {
    return new Promise((resolve, reject) => {
        const chunks = [];
        let size = 0;
        req.on('data', (c) => {
            size += c.length;
            if (size > 4 * 1024 * 1024) {
                reject(new ApiError(413, 'request body too large'));
                req.destroy();
                return;
            }
            chunks.push(c);
        });
        req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
        req.on('error', reject);
    });
}

async function handle(dn, req, res) {
    const url = new URL(req.url, 'http://localhost');
    let path = url.pathname.replace(/\/+$/, '');
    if (path.startsWith('/api/v2')) path = path.slice('/api/v2'.length);
    const params = Object.fromEntries(url.searchParams.entries());
    if (req.method === 'POST') {
        const text = await readBody(req);
        if (text.trim() !== '') {
            let body;
            try {
                body = JSON.parse(text);
            } catch {
                throw new ApiError(400, 'request body is not valid JSON');
            }
            if (body === null || typeof body !== 'object' || Array.isArray(body)) {
                throw new ApiError(400, 'request body must be a JSON object');
            }
            Object.assign(params, body);
        }
    } else if (req.method !== 'GET') {
        throw new ApiError(405, `method ${req.method} not allowed`);
    }
    if (path.startsWith('/devnet/')) {
        const fn = devApi[path.slice('/devnet/'.length)];
        if (!Object.hasOwn(devApi, path.slice('/devnet/'.length))) throw new ApiError(404, `unknown devnet endpoint ${path}`);
        return send(res, 200, { ok: true, result: await fn(dn, params, req.method) });
    }
    const name = path.slice(1);
    if (name === 'jsonRPC') {
        const id = params.id ?? null;
        const m = params.method;
        if (typeof m !== 'string' || !Object.hasOwn(api, m)) {
            throw new ApiError(404, `unknown method ${String(m)}`);
        }
        const result = await api[m](dn, params.params ?? {});
        return send(res, 200, { ok: true, result, jsonrpc: '2.0', id });
    }
    if (!Object.hasOwn(api, name)) throw new ApiError(404, `method not found: ${path}`);
    return send(res, 200, { ok: true, result: await api[name](dn, params) });
}

// ---------------------------------------------------------------- start

async function main() {
    const blockchain = await Blockchain.create({ config: opts.config === 'default' ? 'default' : 'slim' });
    blockchain.setConfig(devnetConfig(blockchain.config));
    blockchain.verbosity = { print: false, blockchainLogs: false, vmLogs: 'none', debugLogs: false };
    const historyLimit = Math.max(1, Number(opts['history-limit']) || HISTORY_LIMIT);
    const store = new StateStore(opts.state || null);
    const dn = new Devnet(blockchain, store, historyLimit);
    store.attach(dn);
    const loaded = await store.load();
    dn.faucet = await blockchain.treasury(FAUCET_SEED, { balance: FAUCET_BALANCE });
    if (!loaded) store.schedule();

    const server = http.createServer((req, res) => {
        handle(dn, req, res).catch((e) => {
            if (e instanceof ApiError) {
                send(res, e.status, { ok: false, error: e.message, code: e.status, ...(e.exitCode !== undefined ? { exit_code: e.exitCode } : {}) });
            } else {
                process.stderr.write(`internal error on ${req.method} ${req.url}: ${e?.stack ?? e}\n`);
                send(res, 500, { ok: false, error: `internal error: ${e?.message ?? e}`, code: 500 });
            }
        });
    });
    server.keepAliveTimeout = 30_000;
    server.on('clientError', (err, socket) => {
        if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    });
    await new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(Number(opts.port), opts.host, resolve);
    });
    const port = server.address().port;
    const startupSeconds = Number(process.hrtime.bigint() - startedAt) / 1e9;
    process.stdout.write(
        JSON.stringify({ event: 'ready', port, host: opts.host, pid: process.pid, startup_seconds: Number(startupSeconds.toFixed(3)), restored: loaded, state: opts.state || null }) + '\n',
    );

    let stopping = false;
    const stop = async (signal) => {
        if (stopping) return;
        stopping = true;
        server.close();
        try {
            await store.flush();
        } catch (e) {
            process.stderr.write(`failed to save state: ${e}\n`);
        }
        process.stderr.write(`devnet stopped (${signal})\n`);
        process.exit(0);
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
}

process.on('uncaughtException', (e) => {
    process.stderr.write(`uncaught exception: ${e?.stack ?? e}\n`);
});
process.on('unhandledRejection', (e) => {
    process.stderr.write(`unhandled rejection: ${e?.stack ?? e}\n`);
});

main().catch((e) => {
    process.stdout.write(JSON.stringify({ event: 'error', error: String(e?.message ?? e) }) + '\n');
    process.stderr.write(`${e?.stack ?? e}\n`);
    process.exit(1);
});
