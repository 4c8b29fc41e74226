// Encoding between @ton/core objects and toncenter v2 JSON shapes.
import { Address, beginCell, Cell, storeMessage, storeStateInit } from '@ton/core';

export const ZERO_HASH_B64 = Buffer.alloc(32).toString('base64');

/** An error answered as {"ok": false, "error": message, "code": status}. */
export class ApiError extends Error {
    constructor(status, message, exitCode) {
        super(message);
        this.status = status;
        this.exitCode = exitCode;
    }
}

export function hashToB64(v) {
    if (Buffer.isBuffer(v)) return v.toString('base64');
    return Buffer.from(v.toString(16).padStart(64, '0'), 'hex').toString('base64');
}

export function parseAddress(value) {
    if (typeof value !== 'string' || value === '') throw new ApiError(416, 'Incorrect address: address is required');
    try {
        if (Address.isFriendly(value)) return Address.parseFriendly(value).address;
        return Address.parseRaw(value);
    } catch {
        throw new ApiError(416, `Incorrect address: ${value.slice(0, 80)}`);
    }
}

export function parseBoc(value, name = 'boc') {
    if (typeof value !== 'string' || value === '') throw new ApiError(400, `${name} must be a base64 BOC string`);
    let buf;
    if (/^[0-9a-fA-F]+$/.test(value) && value.length % 2 === 0 && value.toLowerCase().startsWith('b5ee9c72')) {
        buf = Buffer.from(value, 'hex');
    } else {
        buf = Buffer.from(value.replace(/-/g, '+').replace(/_/g, '/'), 'base64');
    }
    try {
        const cells = Cell.fromBoc(buf);
        if (cells.length !== 1) throw new Error('expected exactly one root cell');
        return cells[0];
    } catch (e) {
        throw new ApiError(400, `Failed to deserialize ${name}: ${e.message}`);
    }
}

function parseNum(v) {
    if (typeof v === 'number') {
        if (!Number.isSafeInteger(v)) throw new ApiError(400, 'stack number is not a safe integer; pass it as a hex or decimal string');
        return BigInt(v);
    }
    if (typeof v !== 'string') throw new ApiError(400, 'stack number must be a string or an integer');
    const s = v.trim();
    const neg = s.startsWith('-');
    const body = neg ? s.slice(1) : s;
    let n;
    try {
        if (/^0x[0-9a-fA-F]+$/.test(body)) n = BigInt(body);
        else if (/^\d+$/.test(body)) n = BigInt(body);
        else throw new Error();
    } catch {
        throw new ApiError(400, `bad stack number ${s.slice(0, 80)}`);
    }
    return neg ? -n : n;
}

function cellArg(v, name) {
    if (v !== null && typeof v === 'object' && typeof v.bytes === 'string') return parseBoc(v.bytes, name);
    return parseBoc(v, name);
}

/** toncenter input stack ([["num", "0x1"], ["tvm.Cell", b64], ...]) -> TupleItem[] */
export function parseStack(stack) {
    if (!Array.isArray(stack)) throw new ApiError(400, 'stack must be an array');
    return stack.map((entry, i) => {
        if (!Array.isArray(entry) || entry.length < 1 || typeof entry[0] !== 'string') {
            throw new ApiError(400, `stack entry ${i} must be [type, value]`);
        }
        const [type, value] = entry;
        switch (type) {
            case 'num':
            case 'number':
            case 'int':
                return { type: 'int', value: parseNum(value) };
            case 'cell':
            case 'tvm.Cell':
                return { type: 'cell', cell: cellArg(value, `stack entry ${i}`) };
            case 'slice':
            case 'tvm.Slice':
                return { type: 'slice', cell: cellArg(value, `stack entry ${i}`) };
            case 'builder':
            case 'tvm.Builder':
                return { type: 'builder', cell: cellArg(value, `stack entry ${i}`) };
            case 'null':
                return { type: 'null' };
            default:
                throw new ApiError(400, `unsupported stack entry type ${type.slice(0, 40)}`);
        }
    });
}

function hexNum(n) {
    return n < 0n ? `-0x${(-n).toString(16)}` : `0x${n.toString(16)}`;
}

function tlEntry(item) {
    switch (item.type) {
        case 'int':
            return { '@type': 'tvm.stackEntryNumber', number: { '@type': 'tvm.numberDecimal', number: item.value.toString() } };
        case 'cell':
        case 'builder':
            return { '@type': 'tvm.stackEntryCell', cell: { '@type': 'tvm.cell', bytes: item.cell.toBoc().toString('base64') } };
        case 'slice':
            return { '@type': 'tvm.stackEntrySlice', slice: { '@type': 'tvm.slice', bytes: item.cell.toBoc().toString('base64') } };
        case 'tuple':
            return { '@type': 'tvm.stackEntryTuple', tuple: { '@type': 'tvm.tuple', elements: item.items.map(tlEntry) } };
        case 'nan':
            return { '@type': 'tvm.stackEntryNumber', number: { '@type': 'tvm.numberDecimal', number: 'NaN' } };
        default:
            return { '@type': 'tvm.stackEntryUnsupported' };
    }
}

/** TupleItem[] -> toncenter output stack, as ton-http-api renders it. */
export function stackToToncenter(items) {
    return items.map((item) => {
        switch (item.type) {
            case 'int':
                return ['num', hexNum(item.value)];
            case 'cell':
            case 'builder':
                return ['cell', { bytes: item.cell.toBoc().toString('base64') }];
            case 'slice':
                // ton-http-api renders slices as cells too
                return ['cell', { bytes: item.cell.toBoc().toString('base64') }];
            case 'tuple':
                return ['tuple', { '@type': 'tvm.tuple', elements: item.items.map(tlEntry) }];
            case 'null':
                return ['null', null];
            case 'nan':
                return ['num', 'NaN'];
            default:
                return ['unsupported', null];
        }
    });
}

function friendly(addr) {
    if (!addr) return '';
    if (Address.isAddress(addr)) return addr.toString({ urlSafe: true, bounceable: true });
    return ''; // external addresses are not shown by toncenter
}

function messageJson(msg) {
    const info = msg.info;
    const body = msg.body ?? new Cell();
    const init = msg.init ? beginCell().store(storeStateInit(msg.init)).endCell() : null;
    const internal = info.type === 'internal';
    let comment = '';
    try {
        const s = body.beginParse();
        if (s.remainingBits >= 32 && s.loadUint(32) === 0) comment = s.loadStringTail();
    } catch {
        comment = '';
    }
    return {
        '@type': 'raw.message',
        hash: msg._hash ?? '',
        source: info.type === 'external-in' ? '' : friendly(info.src),
        destination: info.type === 'external-out' ? '' : friendly(info.dest),
        value: internal ? info.value.coins.toString() : '0',
        extra_currencies: [],
        fwd_fee: internal ? info.forwardFee.toString() : '0',
        ihr_fee: internal ? info.ihrFee.toString() : '0',
        created_lt: internal || info.type === 'external-out' ? info.createdLt.toString() : '0',
        body_hash: body.hash().toString('base64'),
        msg_data: {
            '@type': 'msg.dataRaw',
            body: body.toBoc().toString('base64'),
            init_state: init ? init.toBoc().toString('base64') : '',
        },
        message: comment,
        bounce: internal ? info.bounce : false,
        bounced: internal ? info.bounced : false,
    };
}


function withHash(msg) {
    try {
        msg._hash = beginCell().store(storeMessage(msg)).endCell().hash().toString('base64');
    } catch {
        msg._hash = '';
    }
    return msg;
}

/** A @ton/core Transaction -> toncenter raw.transaction JSON. */
export function txToToncenter(tx, hash) {
    const d = tx.description;
    const storageFee = d.storagePhase?.storageFeesCollected ?? 0n;
    const fee = tx.totalFees.coins;
    const address = new Address(0, Buffer.from(tx.address.toString(16).padStart(64, '0'), 'hex'));
    const outs = [];
    for (const key of tx.outMessages.keys().sort((a, b) => a - b)) outs.push(messageJson(withHash(tx.outMessages.get(key))));
    const cp = d.computePhase;
    return {
        '@type': 'raw.transaction',
        address: { '@type': 'accountAddress', account_address: friendly(address) },
        utime: tx.now,
        data: tx.raw.toBoc().toString('base64'),
        transaction_id: { '@type': 'internal.transactionId', lt: tx.lt.toString(), hash: hash.toString('base64') },
        fee: fee.toString(),
        storage_fee: storageFee.toString(),
        other_fee: (fee - storageFee).toString(),
        in_msg: tx.inMessage ? messageJson(withHash(tx.inMessage)) : null,
        out_msgs: outs,
        // extras (not in toncenter v2): handy for tests, ignored by toncenter clients
        compute: cp?.type === 'vm' ? { gas_used: Number(cp.gasUsed), exit_code: cp.exitCode, success: cp.success } : { skipped: true, reason: cp?.reason ?? null },
        aborted: d.aborted ?? false,
    };
}

/** Hash of the normalized external-in message (src none, import_fee 0, no init, body by ref). */
export function normalizedExtInHash(msg) {
    return beginCell()
        .storeUint(0b10, 2)
        .storeUint(0, 2)
        .storeAddress(msg.info.dest)
        .storeCoins(0)
        .storeBit(0)
        .storeBit(1)
        .storeRef(msg.body ?? new Cell())
        .endCell()
        .hash();
}
