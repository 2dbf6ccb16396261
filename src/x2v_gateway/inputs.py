"""Reading a job's request (JSON, multipart, a form) and getting its input files into the blob
store: multipart uploads, URLs, base64.

Uploads are parsed as they arrive and written straight to disk (python-multipart's streaming
parser on `request.stream()`), so a 1 GB audio track never sits in the gateway's memory. Every
file is checked by its content before it is kept; when anything in a request is wrong, nothing of
that request is kept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import httpx
import msgspec
from litestar import Request
from litestar.datastructures import FormMultiDict
from python_multipart.multipart import Field, MultipartParser, parse_form, parse_options_header

from .blobs import BlobStore, BlobTooLarge, BlobWriter
from .checker import CHECKER, MediaError
from .schemas import INPUT_ROLES, ApiError, JobRequest, field_problem
from .store import JobStore

if TYPE_CHECKING:
    from .forward import UploadForward

MAX_FIELD_BYTES = 64 * 1024
_DATA_URL = re.compile(r"^data:[\w.+\-]+/[\w.+\-]+(?:;[\w\-]+=[\w\-]+)*;base64,", re.I)


@dataclass
class IncomingFile:
    role: str
    writer: BlobWriter


@dataclass(frozen=True)
class StoredInput:
    sha256: str
    size: int
    ext: str


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB"


# While an upload streams in, free disk space is checked again after this many bytes.
FREE_SPACE_CHECK_BYTES = 64 * 1024 * 1024


def check_free_space(blobs: BlobStore, min_free_bytes: int, incoming: int = 0) -> None:
    """507 when the blob store's disk has (or, after `incoming` more bytes, would have) less free
    space than `min_free_bytes`: a full disk would stop the job store and every running job."""
    if min_free_bytes and blobs.free_bytes() - incoming < min_free_bytes:
        raise ApiError(507, "the gateway is short of disk space and takes no new jobs for now;"
                       " try again later")


async def read_multipart(
    content_type: str, body: AsyncIterator[bytes], blobs: BlobStore, *, max_bytes: int,
    max_file_bytes: int | None = None, min_free_bytes: int = 0, forward: UploadForward | None = None,
    roles: dict[str, str] | None = None,
) -> tuple[dict[str, str], list[IncomingFile]]:
    """Parse a multipart body as it streams in: text fields into a dict, files onto disk.

    Over `max_bytes` in all, over `max_file_bytes` in one file: 413, and nothing is kept.
    With `forward`, the files are also copied on to a node as they arrive. `roles` names the
    file parts a client of another API sends (`image_file` -> `image`); default: the roles.
    """
    roles = roles or {role: role for role in INPUT_ROLES}
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary in its Content-Type")

    fields: dict[str, str] = {}
    files: list[IncomingFile] = []
    part: dict = {}
    header: dict[str, bytes] = {"field": b"", "value": b""}
    error: list[ApiError] = []

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, name=None, filename=None, writer=None, text=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][header["field"].decode("latin-1").lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part["headers"].get("content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        part["name"] = name
        if b"filename" in disposition:
            if name not in roles:
                # 422, as an unknown text field gets: both are a field this API does not know.
                raise ApiError(422, f"{name} is not a file field this API knows; files go in "
                               + ", ".join(roles), name)
            if any(f.role == roles[name] for f in files):
                raise ApiError(400, f"{name} was sent twice", name)
            part["writer"] = blobs.writer(limit=max_file_bytes)
            files.append(IncomingFile(roles[name], part["writer"]))
            if forward is not None:
                forward.file_begins(name, fields)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part["writer"] is not None:
            piece = data[start:end]
            try:
                part["writer"].write(piece)
            except BlobTooLarge:
                raise ApiError(413, f"{part['name']} is larger than the {_mib(max_file_bytes or 0)}"
                               " a file may be", part["name"]) from None
            if forward is not None:
                forward.file_data(piece)
        else:
            part["text"] += data[start:end]
            if len(part["text"]) > MAX_FIELD_BYTES:
                raise ApiError(413, f"field {part['name']} is longer than {MAX_FIELD_BYTES} bytes",
                               part["name"])

    def on_part_end() -> None:
        if part["writer"] is not None:
            if forward is not None:
                forward.file_ends()
            return
        name = part["name"]
        if name in fields:
            raise ApiError(400, f"{name} was sent twice", name)
        try:
            fields[name] = part["text"].decode("utf-8")
        except UnicodeDecodeError:
            raise not_utf8(name) from None

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    })
    received, checked = 0, 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_bytes:
                raise ApiError(413, f"request body is larger than the {_mib(max_bytes)} allowed")
            if received - checked > FREE_SPACE_CHECK_BYTES:
                check_free_space(blobs, min_free_bytes)
                checked = received
            parser.write(chunk)
            for incoming in files:
                await incoming.writer.drain()
            if forward is not None:
                await forward.drain()
        parser.finalize()
    except ApiError as exc:
        error.append(exc)
    except Exception as exc:  # the parser's own errors: a malformed body
        error.append(ApiError(400, f"malformed multipart body: {exc}"))
    if error:
        discard(files)
        raise error[0]
    return fields, files


async def read_limited(body: AsyncIterator[bytes], limit: int, too_large: str) -> bytes:
    """A body of at most `limit` bytes, read whole; a larger one is a 413 saying `too_large`."""
    raw = bytearray()
    async for chunk in body:
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, too_large)
    return bytes(raw)


def job_from_json(raw: bytes) -> JobRequest:
    """A job sent as JSON; what is wrong with it names its field."""
    try:
        return msgspec.json.decode(raw, type=JobRequest)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise _validation_error(exc, raw) from None


def job_from_form(fields: dict[str, str]) -> JobRequest:
    """A job sent as form fields (multipart or URL-encoded), every value text."""
    values = {}
    for name, value in fields.items():
        if value.strip() == "":
            continue
        try:
            values[name] = _form_value(name, value)
        except ValueError:
            raise ApiError(422, f"{name} must be two numbers, height and width", name) from None
    try:
        return msgspec.convert(values, JobRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: msgspec.DecodeError, raw: bytes = b"") -> ApiError:
    """A job that msgspec refused, as the API's error naming the field (`raw`: the JSON body)."""
    if isinstance(exc, msgspec.ValidationError):
        field, message = field_problem(exc, JobRequest)
        if field is None:  # the body as a whole: `[1]`, `"t2v"`
            return ApiError(400, f"request body {message} (one job, as JSON)")
        return ApiError(422, message, field)
    if "UTF-8" in str(exc) and (field := _non_utf8_field(raw)):
        return not_utf8(field)
    return ApiError(400, f"request body is not valid JSON: {exc}")


def _non_utf8_field(raw: bytes) -> str | None:
    """The field of a JSON object whose name or text is not valid UTF-8 (msgspec does not say)."""
    try:
        # Each byte that is not UTF-8 becomes a lone surrogate, which no valid text holds.
        doc = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    for name, value in doc.items() if isinstance(doc, dict) else ():
        if not _is_utf8(name) or not _is_utf8(json.dumps(value, ensure_ascii=False)):
            return name
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _form_value(name: str, value: str) -> Any:
    # Browsers send every field of a form, empty or not; an empty field means "not set".
    if name == "target_shape":
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [int(v) for v in re.split(r"[,x× ]+", value) if v]
    if name == "webhook_events":
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def not_utf8(field: str) -> ApiError:
    """The one answer to a text field that is not UTF-8, whichever encoding carried the form."""
    return ApiError(400, f"{field} is not valid UTF-8 text", field)


def declared_size(request: Request) -> int | None:
    """The body size a request's `Content-Length` declares; None when absent or not a number.
    The header is the client's to write: `²` passes `isdigit()` and 5000 digits pass too, and
    `int()` raises on both."""
    value = request.headers.get("content-length", "").strip()
    if not (value.isascii() and value.isdigit()):
        return None
    # Past 18 digits (an exabyte) the exact number no longer matters: it is over every limit.
    return int(value) if len(value) <= 18 else 10**18


def urlencoded_fields(raw: bytes) -> list[tuple[str, str]]:
    """A URL-encoded form's fields, each decoded on its own as UTF-8: `prompt=%ff` is refused
    naming `prompt` (not turned into U+FFFD), as a multipart form refuses it."""
    fields = []
    # Latin-1 maps each byte to one character and back, so the bytes come out as they were sent.
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1"):
        text_name = name.encode("latin-1").decode("utf-8", "replace")
        try:
            name.encode("latin-1").decode("utf-8")
            fields.append((text_name, value.encode("latin-1").decode("utf-8")))
        except UnicodeDecodeError:
            raise not_utf8(text_name) from None
    return fields


def _multipart_non_utf8(content_type: str, body: bytes) -> str | None:
    """The first text field of a (small, in-memory) multipart body that is not UTF-8."""
    bad: list[str] = []

    def on_field(field: Field) -> None:
        try:
            field.field_name.decode("utf-8")
            (field.value or b"").decode("utf-8")
        except UnicodeDecodeError:
            bad.append((field.field_name or b"").decode("utf-8", "replace"))

    try:
        parse_form({"Content-Type": content_type.encode("latin-1")}, io.BytesIO(body), on_field, lambda _: None)
    except Exception:  # a malformed body: the form parser that follows says so
        return None
    return bad[0] if bad else None


async def read_form(request: Request) -> FormMultiDict:
    """A dashboard form (Litestar's parser), with the API's rule for text that is not UTF-8:
    a 400 naming the field, where Litestar would replace it (URL-encoded) or fail (multipart)."""
    content_type = request.headers.get("content-type", "")
    body = await request.body()  # route limits (`request_max_body_size`) bound it
    if content_type.startswith("application/x-www-form-urlencoded"):
        urlencoded_fields(body)
    elif content_type.startswith("multipart/form-data"):
        if field := _multipart_non_utf8(content_type, body):
            raise not_utf8(field)
    return await request.form()


def discard(files: list[IncomingFile]) -> None:
    for incoming in files:
        incoming.writer.discard()


async def fetch_input(
    role: str, value: str, blobs: BlobStore, http: httpx.AsyncClient, *, max_bytes: int
) -> IncomingFile:
    """An input given in JSON: an http(s) URL (downloaded now), a data URL or plain base64."""
    writer = blobs.writer(limit=max_bytes)
    try:
        if value.startswith(("http://", "https://")):
            await _download(role, value, writer, http)
        else:
            encoded = _DATA_URL.sub("", value, count=1) if value.startswith("data:") else value
            if value.startswith("data:") and encoded == value:
                raise ApiError(422, f"{role} is a data URL without ';base64,' data", role)
            try:
                writer.write(base64.b64decode("".join(encoded.split()), validate=True))
            except (binascii.Error, ValueError):
                raise ApiError(
                    422, f"{role} must be an http(s) URL, a data URL or base64 data", role
                ) from None
    except BlobTooLarge:
        writer.discard()
        raise ApiError(413, f"{role} is larger than the {_mib(max_bytes)} allowed", role) from None
    except BaseException:
        writer.discard()
        raise
    if writer.size == 0:
        writer.discard()
        raise ApiError(422, f"{role} is empty", role)
    return IncomingFile(role, writer)


async def _download(role: str, url: str, writer: BlobWriter, http: httpx.AsyncClient) -> None:
    try:
        async with http.stream("GET", url, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ApiError(422, f"{role}: {url} answered HTTP {response.status_code}", role)
            async for chunk in response.aiter_bytes(256 * 1024):
                writer.write(chunk)
                await writer.drain()
    except NotPublic as exc:
        raise ApiError(422, f"{role}: {exc}", role) from None
    except httpx.HTTPError as exc:
        raise ApiError(422, f"{role}: could not download {url} ({type(exc).__name__})", role) from None


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 forms that carry an IPv4 address a packet to them ends up at (through a translator, a
# tunnel relay or the host's own dual stack). Their prefixes look global to `is_global`, so the
# IPv4 address inside is what decides.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052, the well-known prefix
# RFC 8215: a network's own NAT64 prefix, translated inside that network. The IPv4 address sits
# at a place that depends on the prefix length, so the whole range is refused.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible, ::a.b.c.d
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT's IPv4-translated, ::ffff:0:a.b.c.d
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)  # an interface id of 0[2]00:5efe:a.b.c.d


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a packet to this IPv6 address ends up at: mapped, compatible,
    translated, NAT64, 6to4 and Teredo forms (none for any other address)."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or ip in _COMPATIBLE or ip in _TRANSLATED:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # (server, client), the client's address already un-XOR-ed
    return []


def is_public_address(ip: IPAddress) -> bool:
    """True for an address on the public internet; False for private, loopback, link-local,
    multicast and reserved ones, and for IPv6 addresses that carry such an IPv4 address."""
    if ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.is_global
    if ip in _NAT64_LOCAL:
        return False
    embedded = embedded_ipv4(ip)
    if embedded:
        # These prefixes only say how to reach the IPv4 address (Python 3.11 calls some of them
        # global and some not, whatever they carry): the IPv4 address decides.
        return all(is_public_address(v4) for v4 in embedded)
    if (int(ip) >> 32) & 0xFFFFFFFF in _ISATAP_IDS:
        # ISATAP: an ordinary prefix, so it must be public, and the tunnel's IPv4 end too.
        return ip.is_global and is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return ip.is_global


class NotPublic(httpx.ConnectError):
    """An input URL (or a redirect it led to) names a private, loopback or link-local address."""


class PublicOnlyTransport(httpx.AsyncHTTPTransport):
    """Input URLs are fetched by the gateway, inside its network: without this, any key could
    make it read internal services (cloud metadata, a node's API, an admin page). Every request,
    redirects included, must resolve to public addresses only. X2V_PRIVATE_URLS=true turns it off.

    The connection goes to the very address that was checked. Resolving the name again to
    connect would let a DNS answer that changes in between (rebinding) point the fetch at an
    internal address after all. The request keeps the name in its Host header and, over TLS, as
    the server name the certificate is checked against; connections are not kept for reuse,
    since two names on one address would otherwise share a connection made for one of them.
    """

    def __init__(
        self,
        *,
        allowed: Callable[[IPAddress], bool] = is_public_address,
        resolve: Callable[[str, int], Awaitable[list[str]]] | None = None,
    ) -> None:
        super().__init__(limits=httpx.Limits(max_keepalive_connections=0))
        self._allowed = allowed
        self._resolve = resolve or _resolve

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        try:
            addresses = await self._resolve(url.host, url.port or (443 if url.scheme == "https" else 80))
        except OSError:
            addresses = []
        if not addresses:
            raise NotPublic(f"{url.host} does not resolve", request=request)
        for address in addresses:
            if not self._allowed(ipaddress.ip_address(address.split("%")[0])):
                raise NotPublic(
                    f"{url.host} is a private or local address; the gateway fetches inputs from"
                    " public URLs only (send the file itself instead)", request=request,
                )
        extensions = dict(request.extensions)
        if url.scheme == "https":
            extensions["sni_hostname"] = url.host
        pinned = httpx.Request(
            request.method, url.copy_with(host=addresses[0]), headers=request.headers,
            stream=request.stream, extensions=extensions,
        )
        return await super().handle_async_request(pinned)


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [address[0] for *_, address in infos]


async def keep_files(files: list[IncomingFile], store: JobStore, owner: str | None = None) -> dict[str, StoredInput]:
    """Check each file by its content (as `owner`'s checks), then keep it. All or nothing."""
    try:
        kinds = {incoming.role: await check_file(incoming, owner) for incoming in files}
    except BaseException:
        discard(files)
        raise
    stored = {}
    for n, incoming in enumerate(files):
        try:
            stored[incoming.role] = await commit_file(incoming, kinds[incoming.role], store)
        except BaseException:
            discard(files[n + 1:])  # a bucket that failed one: the others' temporary files go too
            raise
    return stored


async def check_file(incoming: IncomingFile, owner: str | None = None) -> str:
    """The kind (extension) of a file by its content; a 422 naming its field when it is not
    what the field needs. Nothing is kept or discarded here."""
    if incoming.writer.size == 0:
        raise ApiError(422, f"{incoming.role} is an empty file", incoming.role)
    try:
        return await CHECKER.inspect(incoming.role, await incoming.writer.written(), owner)
    except MediaError as exc:
        raise ApiError(422, f"{incoming.role} {exc}", incoming.role) from None


async def commit_file(incoming: IncomingFile, kind: str, store: JobStore) -> StoredInput:
    """Keep a checked file in the blob store (once, by its content) and record it."""
    sha, size = await incoming.writer.commit()
    await store.record_blob(sha, size, kind)
    return StoredInput(sha, size, kind)
