"""Encode and decode frames; convert the core's BatchPlan / StepResult to and from protobuf.

A frame that cannot be used raises WireError with a code the receiver puts in its Error reply
("malformed", "version", "unknown"), so a bad frame never takes a process down.
"""

from __future__ import annotations

from itertools import accumulate, chain

from google.protobuf.message import DecodeError

from .pb import worker_pb2 as pb
from .plan import BatchPlan, DecodeBatch, ScheduledSeq, StepInputs, StepResult, TokenLogprob
from .sampling import SamplingParams

# 2: DecodeBatch as packed columns; 3: penalties, min_tokens and logprobs (a worker of 2 would
# ignore them and sample something else than asked: refused instead)
PROTOCOL_VERSION = 3
BODIES = frozenset(f.name for f in pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields)


class WireError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def encode(worker_id: str, body) -> bytes:
    """One frame: `body` is any message of the Envelope's oneof (Register, BatchPlan, ...)."""
    env = pb.Envelope(protocol_version=PROTOCOL_VERSION, worker_id=worker_id)
    field = _field_of(body)
    getattr(env, field).CopyFrom(body)
    return env.SerializeToString()


def decode(frame: bytes) -> tuple[pb.Envelope, str]:
    """Parse a frame into (envelope, body field name); WireError if it cannot be used."""
    try:
        env = pb.Envelope.FromString(frame)
    except (DecodeError, TypeError) as e:
        raise WireError("malformed", f"not an Envelope frame ({len(frame)} bytes): {e}") from e
    if env.protocol_version != PROTOCOL_VERSION:
        raise WireError(
            "version",
            f"protocol version {env.protocol_version}, this side speaks {PROTOCOL_VERSION}",
        )
    body = env.WhichOneof("body")
    if body is None:
        raise WireError("unknown", "frame carries no known message")
    return env, body


def _field_of(body) -> str:
    name = type(body).DESCRIPTOR.name
    field = name[0].lower() + "".join(f"_{c.lower()}" if c.isupper() else c for c in name[1:])
    field = {"batch_plan": "plan", "step_result": "result"}.get(field, field)
    if field not in BODIES:
        raise TypeError(f"{name} is not an Envelope body")
    return field


# ---- core types <-> protobuf ------------------------------------------------------------


def _sampling_to_proto(sp: SamplingParams) -> pb.SamplingParams:
    m = pb.SamplingParams(
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        has_seed=sp.seed is not None,
        seed=sp.seed or 0,
    )
    if sp.processed:  # fields left at their defaults cost no bytes
        m.has_logprobs = sp.logprobs is not None
        m.logprobs = sp.logprobs or 0
        m.presence_penalty = sp.presence_penalty
        m.frequency_penalty = sp.frequency_penalty
        m.repetition_penalty = sp.repetition_penalty
        if sp.min_tokens:  # only then does a worker mask EOS and stop ids
            m.min_tokens = sp.min_tokens
            m.ignore_eos = sp.ignore_eos
            m.stop_token_ids.extend(sp.stop_token_ids)
    return m


def _sampling_from_proto(m: pb.SamplingParams) -> SamplingParams:
    # max_tokens and stopping are the scheduler's business; the worker only samples.
    return SamplingParams(
        temperature=m.temperature,
        top_p=m.top_p,
        top_k=m.top_k,
        seed=m.seed if m.has_seed else None,
        stop_token_ids=tuple(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        logprobs=m.logprobs if m.has_logprobs else None,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        repetition_penalty=m.repetition_penalty or 1.0,  # 0 (unset) means off
        min_tokens=m.min_tokens,
    )


def _sampling_columns(sampling) -> tuple[list[pb.SamplingParams], list[int], bool]:
    """The distinct settings among rows, each row's index into them, and whether some row
    needs its prompt length (`SamplingParams.needs_prompt_len`).

    Rows of one request share one SamplingParams object, so most rows hit the identity cache;
    equal settings of different requests collapse by value."""
    by_id: dict[int, int] = {}
    by_value: dict[tuple, int] = {}
    sets: list[pb.SamplingParams] = []
    index: list[int] = []
    needs_len = False
    for sp in sampling:
        i = by_id.get(id(sp))
        if i is None:
            # What the wire carries of sp (stop ids and ignore_eos only with min_tokens), read
            # inline: this runs for every row of a request of its own, every step.
            key = (
                sp.temperature,
                sp.top_p,
                sp.top_k,
                sp.seed,
                sp.logprobs,
                sp.presence_penalty,
                sp.frequency_penalty,
                sp.repetition_penalty,
                sp.min_tokens and (sp.ignore_eos, sp.stop_token_ids),
            )
            i = by_value.get(key)
            if i is None:
                i = by_value[key] = len(sets)
                sets.append(_sampling_to_proto(sp))
                needs_len = needs_len or sp.needs_prompt_len
            by_id[id(sp)] = i
        index.append(i)
    return sets, index, needs_len


def plan_to_proto(plan: BatchPlan) -> pb.BatchPlan:
    d = plan.decodes
    if d.token_ids is None and len(d):
        raise ValueError(
            "a plan sent to a worker needs token ids (the simulator's plans have none)"
        )
    sets, index, needs_len = _sampling_columns(d.sampling)
    needs_len = needs_len or any(s.sampling.needs_prompt_len for s in plan.prefills)
    if needs_len and len(d) and d.prompt_lens is None:
        raise ValueError("a plan whose sampling needs prompt lengths has none")
    decodes = pb.DecodeBatch(
        request_ids=d.request_ids,
        positions=d.positions,
        token_ids=d.token_ids or (),
        table_lens=[len(t) for t in d.block_tables],
        block_ids=list(chain.from_iterable(d.block_tables)),
        sampling_sets=sets,
        sampling_index=index,
        prompt_lens=(d.prompt_lens or ()) if needs_len else (),
    )
    prefills = [
        pb.PrefillChunk(
            request_id=s.request_id,
            start_pos=s.start_pos,
            token_ids=s.token_ids or (),
            block_table=pb.BlockTable(blocks=s.block_table),
            sample=s.sample,
            sampling=_sampling_to_proto(s.sampling),
            prompt_len=s.prompt_len,  # one varint beside a chunk's tokens
        )
        for s in plan.prefills
    ]
    copies = [pb.BlockCopy(src=a, dst=b) for a, b in plan.block_copies]
    return pb.BatchPlan(
        step_id=plan.step_id, decodes=decodes, prefills=prefills, block_copies=copies
    )


def _decode_columns(
    m: pb.BatchPlan,
) -> tuple[list[int], list[int], list[SamplingParams], list[int]]:
    """The decode columns both decoders start from, checked once: (table_lens, block_ids,
    sampling_sets, sampling_index); WireError("invalid") when they do not fit together."""
    d = m.decodes
    n = len(d.request_ids)
    lens = list(d.table_lens)
    if not (len(d.positions) == len(lens) == len(d.sampling_index) == len(d.token_ids) == n):
        raise WireError("invalid", f"step {m.step_id}: decode columns differ in length")
    blocks = list(d.block_ids)
    if sum(lens) != len(blocks):
        raise WireError("invalid", f"step {m.step_id}: table_lens do not cover block_ids")
    if d.prompt_lens and len(d.prompt_lens) != n:
        raise WireError("invalid", f"step {m.step_id}: decode columns differ in length")
    sets = [_sampling_from_proto(s) for s in d.sampling_sets]
    index = list(d.sampling_index)
    if index and max(index) >= len(sets):
        raise WireError("invalid", f"step {m.step_id}: sampling_index past sampling_sets")
    return lens, blocks, sets, index


def plan_from_proto(m: pb.BatchPlan, worker_id: str) -> BatchPlan:
    d = m.decodes
    lens, blocks, sets, index = _decode_columns(m)
    ends = list(accumulate(lens))
    decodes = DecodeBatch(
        tuple(d.request_ids),
        tuple(d.positions),
        tuple(blocks[e - k : e] for e, k in zip(ends, lens, strict=True)),
        tuple(map(sets.__getitem__, index)),
        tuple(d.token_ids),
        tuple(d.prompt_lens) or None,
    )
    prefills = []
    for p in m.prefills:
        if not p.token_ids:
            raise WireError("invalid", f"step {m.step_id}: prefill of {p.request_id} has no tokens")
        prefills.append(
            ScheduledSeq(
                p.request_id,
                p.start_pos,
                len(p.token_ids),
                tuple(p.block_table.blocks),
                p.sample,
                _sampling_from_proto(p.sampling),
                tuple(p.token_ids),
                p.prompt_len,
            )
        )
    copies = tuple((c.src, c.dst) for c in m.block_copies)
    return BatchPlan(m.step_id, worker_id, decodes, tuple(prefills), copies)


def step_inputs_from_proto(m: pb.BatchPlan, worker_id: str) -> StepInputs:
    """A worker's view of a plan: the decode columns as they come off the wire (no row
    objects, no per-row SamplingParams), the prefill chunks appended as rows. Checked like
    `plan_from_proto`; what only the pool can check (table bounds) is the runner's."""
    d = m.decodes
    n = len(d.request_ids)
    lens, blocks, sets, index = _decode_columns(m)
    tokens = list(d.token_ids)
    positions = list(d.positions)
    rids = list(d.request_ids)
    query_lens = rows = None
    prompt_lens, history = _progress_columns(m, sets, index)
    if m.prefills:
        query_lens = [1] * n
        rows = list(range(n))
        for k, p in enumerate(m.prefills):
            if not p.token_ids:
                raise WireError(
                    "invalid", f"step {m.step_id}: prefill of {p.request_id} has no tokens"
                )
            rids.append(p.request_id)
            positions.append(p.start_pos)
            tokens.extend(p.token_ids)
            query_lens.append(len(p.token_ids))
            lens.append(len(p.block_table.blocks))
            blocks.extend(p.block_table.blocks)
            if p.sample:
                rows.append(n + k)
                index.append(len(sets))
                sets.append(_sampling_from_proto(p.sampling))
            if prompt_lens is not None and history is not None:
                prompt_lens.append(p.prompt_len)
                if _penalized(p.sampling):
                    history.append(n + k)
    copies = [(c.src, c.dst) for c in m.block_copies]
    return StepInputs(
        m.step_id,
        worker_id,
        rids,
        positions,
        tokens,
        lens,
        blocks,
        sets,
        index,
        n,
        query_lens,
        rows,
        copies,
        prompt_lens,
        history or None,
    )


def _penalized(m: pb.SamplingParams) -> bool:
    return bool(m.presence_penalty or m.frequency_penalty) or m.repetition_penalty not in (0, 1)


def _progress_columns(
    m: pb.BatchPlan, sets: list[SamplingParams], index: list[int]
) -> tuple[list[int] | None, list[int] | None]:
    """(prompt_lens, history_rows) of the decode rows, both None when no row of the plan needs
    them (the decode sets are checked, then each prefill chunk's settings: a few messages)."""
    needs = any(sp.needs_prompt_len for sp in sets) or any(
        p.sampling.min_tokens or _penalized(p.sampling) for p in m.prefills
    )
    if not needs:
        return None, None
    n = len(m.decodes.request_ids)
    penalized = {k for k, sp in enumerate(sets) if sp.penalized}
    history = [r for r in range(n) if index[r] in penalized] if penalized else []
    return list(m.decodes.prompt_lens) or [0] * n, history


def result_to_proto(r: StepResult) -> pb.StepResult:
    failed = [pb.StepResult.RowFailure(request_id=rid, reason=why) for rid, why in r.failed]
    m = pb.StepResult(
        step_id=r.step_id,
        tokens=r.tokens,
        forward_s=r.forward_s,
        error=r.error or "",
        failed=failed,
    )
    for row, lp in enumerate(r.logprobs):  # only rows that asked: the rest cost nothing
        if lp is not None:
            m.logprob_rows.append(row)
            m.sampled_logprobs.append(lp.logprob)
            m.top_counts.append(len(lp.top))
            m.top_ids.extend(t for t, _ in lp.top)
            m.top_logprobs.extend(v for _, v in lp.top)
    return m


def result_from_proto(m: pb.StepResult, worker_id: str) -> StepResult:
    failed = tuple((f.request_id, f.reason) for f in m.failed)
    tokens = tuple(m.tokens)
    return StepResult(
        m.step_id,
        worker_id,
        tokens,
        m.forward_s,
        m.error or None,
        failed,
        _logprobs_from_proto(m, tokens),
    )


def _logprobs_from_proto(m: pb.StepResult, tokens: tuple[int, ...]) -> tuple:
    """One entry per token (None for rows that did not ask), or () when no row did; a frame
    whose columns do not fit together is WireError("invalid")."""
    rows = m.logprob_rows
    if not rows:
        return ()
    counts = m.top_counts
    if not len(m.sampled_logprobs) == len(counts) == len(rows) or not (
        sum(counts) == len(m.top_ids) == len(m.top_logprobs)
    ):
        raise WireError("invalid", f"step {m.step_id}: logprob columns differ in length")
    if max(rows) >= len(tokens):
        raise WireError("invalid", f"step {m.step_id}: logprob_rows past tokens")
    out: list[TokenLogprob | None] = [None] * len(tokens)
    ids, values, at = m.top_ids, m.top_logprobs, 0
    for row, lp, k in zip(rows, m.sampled_logprobs, counts, strict=True):
        top = tuple(zip(ids[at : at + k], values[at : at + k], strict=True))
        out[row] = TokenLogprob(tokens[row], lp, top)
        at += k
    return tuple(out)
