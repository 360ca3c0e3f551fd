"""The URIs of listening sockets: the same quoting as urllib.parse, which a start
imports only for a name or path that needs it."""

from __future__ import annotations

import random
from urllib.parse import quote as urllib_quote

from liveclone.nbd.listeners import quote, tcp_uri, unix_uri

ODD = ["", "/", "disk.img", "/run/clone img.sock", "a%b", "ü/ß", "[::1]", "a:b@c?d#e",
       "~user/x_y-z.w", "\x00\x7f", "name with spaces", "+&=;,"]


def test_quote_is_urllib_quote() -> None:
    rng = random.Random(12)
    alphabet = [chr(c) for c in range(0, 0x180)] + ["/", "\u20ac", "\U0001f600"]
    texts = ODD + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
                   for _ in range(5000)]
    for text in texts:
        for safe in ("", "/"):
            assert quote(text, safe) == urllib_quote(text, safe=safe), (text, safe)


def test_uris_quote_names_and_paths() -> None:
    assert unix_uri("/run/a b.sock", "ü") == "nbd+unix:///%C3%BC?socket=/run/a%20b.sock"
    assert unix_uri("/run/x.sock", "disk", tls=True) == "nbds+unix:///disk?socket=/run/x.sock"
    assert tcp_uri("::1", 10809, "a/b") == "nbd://[::1]:10809/a%2Fb"
