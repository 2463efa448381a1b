"""HTTP/1.1 request framing (RFC 9112): where a request ends, agreed with
whoever else reads it.

waitress 3.0.2, on its own, lets a client that faces it directly mislead
it:

* it reads a request that carries both ``Content-Length`` and
  ``Transfer-Encoding: chunked`` as chunked and keeps the connection open,
  so bytes hidden in the declared body become the next request (request
  smuggling, Pylons/waitress#464); after any refused request it goes on
  parsing the bytes that follow;
* it waits for CRLF CRLF only, so a request whose lines end in a bare LF
  is never answered and holds its connection until the channel timeout.

:class:`RequestParser` subclasses waitress's parser: it checks the framing
(:func:`check_framing`) before waitress reads it, and once it has refused a
request it claims every byte that follows, so that nothing after a refusal
is read as a request (the channel, :mod:`.channel`, then closes).
"""

from __future__ import annotations

import re

from waitress.parser import HTTPRequestParser, ParsingError
from waitress.utilities import BadRequest

#: A LF not preceded by CR. RFC 9112 §2.2 lets a recipient accept one as a
#: line terminator, but a proxy in front that does not would read the
#: same bytes as different fields; the request is refused instead.
_BARE_LF = re.compile(rb"(?<!\r)\n")
#: ``Content-Length = 1*DIGIT`` (RFC 9110 §8.6): no sign, no separators.
_DIGITS = re.compile(rb"[0-9]+")


def check_framing(first_line, fields):
    """Refuse (``ParsingError``, answered 400) a request head whose framing
    is ambiguous; ``fields`` are the raw field lines after the request-line.

    Of the fields that frame the body only one interpretation may be
    possible, whoever reads them: a proxy in front and this server must
    agree on where a request ends.
    """
    lengths, codings, hosts = [], [], 0
    for line in fields.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: a server MUST reject obs-fold with 400 (or
            # unfold it); waitress unfolds it.
            raise ParsingError("obsolete line folding in a header field (RFC 9112 §5.2)")
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            codings.append(value.strip(b" \t"))
        elif name == b"host":
            hosts += 1
    http11 = first_line.rstrip().endswith(b" HTTP/1.1")
    # RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host, and for
    # any request with more than one.
    if hosts > 1:
        raise ParsingError("more than one Host header field (RFC 9112 §3.2)")
    if http11 and not hosts:
        raise ParsingError("an HTTP/1.1 request needs a Host header field (RFC 9112 §3.2)")
    if codings:
        if not http11:
            # RFC 9112 §6.1: faulty framing; waitress would ignore the field
            # and read Content-Length.
            raise ParsingError("Transfer-Encoding in a request that is not HTTP/1.1 "
                               "(RFC 9112 §6.1)")
        if lengths:
            # RFC 9112 §6.1: the server MAY reject, and MUST close after.
            raise ParsingError("both Content-Length and Transfer-Encoding (RFC 9112 §6.1)")
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            # RFC 9112 §6.3: chunked not final is 400; a coding we do not
            # implement would be 501 (§6.1), but we close either way and
            # one answer for any Transfer-Encoding but chunked is simpler.
            raise ParsingError("Transfer-Encoding must be exactly chunked (RFC 9112 §6.1)")
    if len(lengths) > 1:
        # RFC 9112 §6.3: an invalid Content-Length is an unrecoverable
        # framing error; repeated fields are refused even when they agree.
        raise ParsingError("more than one Content-Length (RFC 9112 §6.3)")
    if lengths and not _DIGITS.fullmatch(lengths[0]):
        raise ParsingError("Content-Length must be decimal digits only (RFC 9110 §8.6)")


class RequestParser(HTTPRequestParser):
    """waitress's parser, refusing ambiguous framing and bare LF.

    Once a request is refused (``error`` set) the parser claims every byte
    it is given, so waitress never reads what follows as another request.
    """

    def received(self, data):
        if self.completed:
            return 0
        if self.body_rcv is None and b"\n" in data:
            # Still in the head: look for a bare LF in its new bytes (the
            # look-behind sees the byte received before them).
            head = self.header_plus + data
            end = head.find(b"\r\n\r\n")
            if _BARE_LF.search(head, len(self.header_plus), end if end >= 0 else len(head)):
                self.refuse(BadRequest("bare LF in the request head: lines end with CRLF "
                                       "(RFC 9112 §2.2)"))
                return len(data)
        consumed = super().received(data)
        if self.error is not None:
            return len(data)
        return consumed

    def parse_header(self, header_plus):
        end = header_plus.find(b"\r\n")
        if end >= 0:
            check_framing(header_plus[:end], header_plus[end + 2:])
        super().parse_header(header_plus)

    def refuse(self, error):
        """Complete this request as the refusal ``error`` (answered, then closed)."""
        # The fields an error task reads, as waitress fills them for its 431.
        self.parse_header(b"GET / HTTP/1.0\r\n")
        self.error = error
        self.headers_finished = self.completed = True
