"""TLS for the core's TCP listener: its self-signed certificate, both contexts, and pinning.

The core makes its certificate once (like the authkey) and every remote plugin pins exactly that
certificate: it is the only CA the client trusts and its SHA-256 fingerprint must match, so no
host name and no public CA are involved. TLS 1.2 at least (1.3 when both ends have it).

The sockets keep a plain socket's manners for the core's non-blocking I/O loop: no data is
``BlockingIOError`` (not ``SSLWantReadError``), ``sendmsg`` works, ``shutdown`` leaves TLS in
place. Decrypted bytes that TLS holds after a read are invisible to epoll: the server learns of
them through ``watch``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import ssl
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

from aigis._errors import AigisError

log = logging.getLogger(__name__)

CERT_MODE = 0o644  # public: remote hosts get a copy to pin
KEY_MODE = 0o600  # the core's alone; never shipped
DIR_MODE = 0o755
_CHUNK = 256 * 1024  # bytes joined into one TLS write when a frame comes in several parts
_RECORD = 16 * 1024  # TLS's largest record: a read that filled one may have more behind it
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# the peer went away during the handshake: worth another attempt, unlike a refused certificate
_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


# why a peer that never spoke TLS is refused, for the core's log
PLAINTEXT_HINT = (
    "a plaintext client? this listener requires TLS: set AIGIS_TLS_CERT_FILE for the plugin, "
    "or allow plaintext on a trusted network with [aigis] tcp_plaintext = true"
)


class TlsError(AigisError):
    """A TLS peer or file that cannot be used (a certificate that is not the pinned one)."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate, as ``AB:CD:...`` (what ``openssl x509 -fingerprint`` shows)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


# --- the core's certificate ------------------------------------------------------------------


def load_or_create_certificate(cert_file: Path, key_file: Path, name: str = "AIGIS core") -> str:
    """Make the core's self-signed certificate and key once, reuse them after; returns the
    certificate's fingerprint.

    Both files live in one directory made whole and then renamed into place: two cores starting
    at once agree on one pair, and a crash never leaves a certificate without its key.
    """
    cert_file, key_file = Path(cert_file), Path(key_file)
    folder = cert_file.parent
    if key_file.parent != folder:
        raise ValueError("the TLS certificate and key must share a directory")
    if not folder.exists():
        _create_pair(cert_file, key_file, name)
    for path, what in ((cert_file, "certificate"), (key_file, "private key")):
        if not path.exists():
            raise AigisError(
                f"the core's TLS {what} {path} is missing: restore it, or remove {folder} to "
                f"make a new pair (every remote host then needs the new certificate)"
            )
    _tighten(key_file)
    return fingerprint(ssl.PEM_cert_to_DER_cert(_read(cert_file, "certificate")))


def _read(path: Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise AigisError(f"cannot read the TLS {what} {path}: {reason}") from None


def _tighten(key_file: Path) -> None:
    try:
        mode = os.stat(key_file).st_mode & 0o777
        if mode & ~KEY_MODE:
            os.chmod(key_file, KEY_MODE)
            log.warning("tightened: TLS private key %s from %04o to %04o", key_file, mode, KEY_MODE)
    except OSError as exc:
        raise AigisError(
            f"cannot restrict the TLS private key {key_file}: {exc.strerror}"
        ) from None


def _create_pair(cert_file: Path, key_file: Path, name: str) -> None:
    cert_pem, key_pem = make_self_signed(name)
    folder = cert_file.parent
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(DIR_MODE)
        os.chmod(tmp, DIR_MODE)  # explicit: the umask must not decide
        for path, data, mode in ((key_file, key_pem, KEY_MODE), (cert_file, cert_pem, CERT_MODE)):
            fd = os.open(tmp / path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            os.rename(tmp, folder)  # atomic; fails if another core made the folder first
        except OSError as exc:
            if not folder.is_dir():
                raise
            log.debug("kept: TLS pair made meanwhile in %s (%s)", folder, exc.strerror)
            return
    except OSError as exc:
        raise AigisError(f"cannot create the TLS certificate in {folder}: {exc.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "created: TLS certificate %s and private key %s (mode %04o)", cert_file, key_file, KEY_MODE
    )


def make_self_signed(name: str) -> tuple[bytes, bytes]:
    """A new P-256 key and a self-signed certificate for it, both PEM: (certificate, key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # pinned, so dates carry no meaning: a remote host whose clock is off must not fail
        .not_valid_before(datetime.datetime(2000, 1, 1))
        .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("aigis-core")]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- the core's side -------------------------------------------------------------------------


def _base_context(protocol: int) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The listener's context: the core's certificate, no client certificates (the authkey
    handshake inside TLS proves who the peer is), no session tickets."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise AigisError(
            f"cannot use the TLS certificate {cert_file} with its key {key_file}: {reason}"
        ) from None
    # tickets would be unsolicited bytes after the handshake, and reconnects are rare
    context.num_tickets = 0
    context.sslsocket_class = ServerSocket
    return context


def listener_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The TCP listener's context, with the core's certificate made first if need be."""
    print_ = load_or_create_certificate(cert_file, key_file)
    log.info("loaded: TLS certificate %s (SHA-256 %s)", cert_file, print_)
    return server_context(cert_file, key_file)


def accept(context: ssl.SSLContext, sock: socket.socket) -> ServerSocket:
    """Wrap an accepted non-blocking TCP socket (``ServerSocket.advance`` runs the handshake)."""
    # a peer that already reset: an OSError here, where the accept loop expects one (ssl's own
    # check would leave its half-made socket open, or make one without TLS)
    sock.getpeername()
    wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    assert isinstance(wrapped, ServerSocket)
    if wrapped._sslobj is None:  # the peer left in between: ssl made no TLS object
        wrapped.close()
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
    return wrapped


class ServerSocket(ssl.SSLSocket):
    """A non-blocking TLS socket with a plain one's manners (see the module's docstring)."""

    _sslobj: Any  # the TLS object (ssl's own), set by SSLSocket
    _peeked = b""  # decrypted bytes a MSG_PEEK read took out of TLS, served first
    _watch: MutableMapping[Any, None] | None = None
    _owner: object = None

    def watch(self, registry: MutableMapping[Any, None], owner: object) -> None:
        """After each read that leaves decrypted bytes inside TLS, put ``owner`` in
        ``registry``: epoll will not report those bytes."""
        self._watch, self._owner = registry, owner

    def advance(self) -> str | None:
        """One step of the handshake: None once done, else "read" or "write" (what it waits
        for). Raises TlsError saying why the peer failed."""
        try:
            self.do_handshake()
        except ssl.SSLWantReadError:
            return "read"
        except ssl.SSLWantWriteError:
            return "write"
        except ssl.SSLEOFError:
            raise TlsError(f"closed during the TLS handshake ({PLAINTEXT_HINT})") from None
        except ssl.SSLError as exc:
            raise TlsError(f"bad TLS handshake ({why(exc)})") from None
        except OSError as exc:
            raise TlsError(f"bad TLS handshake ({exc.strerror or exc})") from None
        return None

    def waiting(self) -> int:
        """Decrypted bytes held here or inside TLS, which epoll does not see."""
        return len(self._peeked) + super().pending()

    # The reads and writes below call the TLS object itself (``_sslobj``), not SSLSocket's
    # read/write layers: one Python call per operation on the calls' path.

    def _noted(self) -> None:
        if self._watch is not None and (self._peeked or self._sslobj.pending()):
            self._watch[self._owner] = None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if getattr(self, "_sslobj", None) is None:
            # being made: ssl looks for bytes sent before TLS on a peer that already left
            return super().recv(buflen, flags)
        peeked = self._peeked
        if peeked:
            self._peeked = peeked[buflen:]
            self._noted()
            return peeked[:buflen]
        try:
            data = self._sslobj.read(buflen)
        except _WANT:
            raise BlockingIOError from None
        except ssl.SSLEOFError:
            return b""  # closed without TLS's goodbye: a plain EOF to the caller
        self._noted()
        return data

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        size = nbytes or len(buffer)
        if flags:  # only MSG_PEEK is ever asked for
            return self._peek(memoryview(buffer), size)
        if self._peeked:
            return self._recv_after_peek(memoryview(buffer), size)
        try:
            got = self._sslobj.read(size, buffer)
        except _WANT:
            raise BlockingIOError from None
        except ssl.SSLEOFError:
            return 0
        except AttributeError:  # closed: ssl dropped its TLS object
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None
        if got == _RECORD and got < size:  # a full record: more may be behind it already
            got += self._more(memoryview(buffer), got, size)
        if self._watch is not None and self._sslobj.pending():
            self._watch[self._owner] = None
        return got

    def _more(self, view: memoryview, got: int, size: int) -> int:
        """Further records already in, into ``view[got:size]`` (0 when none are)."""
        start = got
        read = self._sslobj.read
        while got < size:
            try:
                n = read(size - got, view[got:])
            except (*_WANT, ssl.SSLEOFError):
                break  # the next read reports it
            got += n
            if n < _RECORD:
                break
        return got - start

    def _recv_after_peek(self, view: memoryview, size: int) -> int:
        peeked = self._peeked
        got = min(size, len(peeked))
        view[:got] = peeked[:got]
        self._peeked = peeked[got:]
        if got < size and not self._peeked:
            got += self._more(view, got, size)
        self._noted()
        return got

    def _peek(self, view: memoryview, size: int) -> int:
        """Up to one TLS record, kept to be read again (TLS cannot leave bytes in the kernel)."""
        if not self._peeked:
            try:
                self._peeked = self._sslobj.read(min(size, _RECORD))
            except _WANT:
                raise BlockingIOError from None
            except ssl.SSLEOFError:
                return 0
        got = min(size, len(self._peeked))
        view[:got] = self._peeked[:got]
        return got

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return self._sslobj.write(data)
        except _WANT:
            raise BlockingIOError from None
        except AttributeError:  # closed (e.g. by a stop while a slow call still replies)
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def sendmsg(self, buffers: Sequence[Any], *_args: Any) -> int:  # type: ignore[override]
        return self.send(_joined(buffers))

    def shutdown(self, how: int) -> None:
        # ssl.SSLSocket.shutdown drops TLS, and a later send would go out in the clear
        socket.socket.shutdown(self, how)


def _joined(buffers: Sequence[Any]) -> Any:
    """The first ``_CHUNK`` bytes or so of ``buffers`` as one buffer. The same buffers always
    give the same bytes: a TLS write that must be retried is retried with the same data."""
    first = buffers[0]
    if len(buffers) == 1 or memoryview(first).nbytes >= _CHUNK:
        return first
    out = bytearray()
    for part in buffers:
        view = memoryview(part).cast("B")
        out += view[: _CHUNK - len(out)]
        if len(out) >= _CHUNK:
            break
    return out


# --- the plugins' side -----------------------------------------------------------------------


class Pin:
    """TLS to the core, trusting exactly the certificate in ``cert_file`` (no host names)."""

    def __init__(self, cert_file: Path) -> None:
        self.file = Path(cert_file)
        pem = _read(self.file, "certificate")
        try:
            self.fingerprint = fingerprint(ssl.PEM_cert_to_DER_cert(pem))
            context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False  # the pin is the identity, not a name
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=pem)
        except (ValueError, ssl.SSLError) as exc:
            raise TlsError(
                f"the TLS certificate file {self.file} is not a PEM certificate: {exc}"
            ) from None
        context.sslsocket_class = ClientSocket
        self.context = context

    def wrap(self, sock: socket.socket) -> ClientSocket:
        """TLS over the connected ``sock`` (handshake done, within its timeout); TlsError when
        the peer's certificate is not the pinned one or the peer does not speak TLS."""
        try:
            wrapped = self.context.wrap_socket(sock)
        except _TRANSIENT:
            raise  # an OSError: the caller retries, as for any connection that broke
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(
                f"its TLS certificate is not the one pinned in {self.file} "
                f"(verification: {exc.verify_message})"
            ) from None
        except ssl.SSLError as exc:
            raise TlsError(
                f"TLS handshake failed ({why(exc)}); if the core allows plaintext "
                f"([aigis] tcp_plaintext = true), do not pin {self.file}"
            ) from None
        der = wrapped.getpeercert(binary_form=True)
        if der is None or fingerprint(der) != self.fingerprint:
            wrapped.close()
            raise TlsError(f"its TLS certificate is not the one pinned in {self.file}")
        assert isinstance(wrapped, ClientSocket)
        return wrapped


class ClientSocket(ssl.SSLSocket):
    """A blocking TLS socket that also takes ``sendmsg`` and a peek for a closed peer; reads and
    writes call the TLS object itself (its timeout still applies)."""

    _sslobj: Any

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        write = self._sslobj.write
        sent = write(view)
        while sent < len(view):
            sent += write(view[sent:])

    def sendmsg(self, buffers: Sequence[Any], *_args: Any) -> int:  # type: ignore[override]
        return self._sslobj.write(_joined(buffers))

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if flags:
            return super().recv_into(buffer, nbytes, flags)  # refused, as SSLSocket does
        try:
            return self._sslobj.read(nbytes or len(buffer), buffer)
        except ssl.SSLEOFError:
            return 0  # closed without TLS's goodbye: a plain EOF to the caller

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if not flags:
            return super().recv(buflen)
        # a peek only asks whether the peer closed or talked unasked: look at the wire
        if self._sslobj.pending():
            return b"\0"
        return socket.socket.recv(self, buflen, flags)


def looks_like_client_hello(data: bytes) -> bool:
    """Whether ``data`` starts like a TLS handshake record (a TLS client on a plaintext port)."""
    return data[:1] == b"\x16" and data[1:2] == b"\x03"


def why(exc: ssl.SSLError) -> str:
    """An OpenSSL error as a short phrase: ``wrong version number``."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__
