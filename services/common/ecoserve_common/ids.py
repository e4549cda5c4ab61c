"""One id and one clock for a request, whichever service touches it.

- A request id is minted once, at the API edge that accepts the request (or taken from the
  caller), and is then the HTTP response id, the gRPC id, the store's primary key, the log field
  and the metrics label. OpenAI clients expect a prefix ("cmpl-", "chatcmpl-"): the prefix is part
  of the id, not added on the way out.
- Time inside the scheduler core is `time.monotonic()` seconds passed in by its shell (the live
  engine or the simulator's virtual clock); wall-clock time (`time.time()`) appears only at the
  edges that report to people: the store's timestamps and the OpenAI `created` field.
"""

from __future__ import annotations

import re
import uuid

MAX_ID_LEN = 128
_ID = re.compile(r"^[A-Za-z0-9._:-]+$")


def new_request_id(prefix: str = "req-") -> str:
    """A fresh id: `prefix` + 32 hex digits."""
    return f"{prefix}{uuid.uuid4().hex}"


def check_request_id(request_id: str) -> str | None:
    """Why a caller-supplied id is unusable, or None: ids travel in logs, metrics labels and
    URLs, so they are short and plain."""
    if not request_id:
        return "request id is empty"
    if len(request_id) > MAX_ID_LEN:
        return f"request id longer than {MAX_ID_LEN} characters"
    if not _ID.match(request_id):
        return "request id may hold only letters, digits and . _ : -"
    return None
