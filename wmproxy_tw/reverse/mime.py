"""The file server's MIME table: fixed (not the host's /etc/mime.types), overridable.

A fixed table keeps responses the same on every machine; ``ext_mimetype``
adds or replaces entries, ``default_mimetype`` covers the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["MIME_TYPES", "MimeTable", "compressible"]

MIME_TYPES: dict[str, str] = {
    # text
    "html": "text/html", "htm": "text/html", "shtml": "text/html", "css": "text/css",
    "txt": "text/plain", "text": "text/plain", "md": "text/markdown", "csv": "text/csv",
    "xml": "text/xml", "js": "text/javascript", "mjs": "text/javascript",
    "toml": "text/plain", "yaml": "text/plain", "yml": "text/plain", "ini": "text/plain",
    "log": "text/plain", "ics": "text/calendar", "vtt": "text/vtt",
    # application
    "json": "application/json", "map": "application/json", "jsonld": "application/ld+json",
    "webmanifest": "application/manifest+json", "wasm": "application/wasm",
    "pdf": "application/pdf", "rtf": "application/rtf", "zip": "application/zip",
    "gz": "application/gzip", "tgz": "application/gzip", "bz2": "application/x-bzip2",
    "xz": "application/x-xz", "zst": "application/zstd", "7z": "application/x-7z-compressed",
    "rar": "application/vnd.rar", "tar": "application/x-tar", "jar": "application/java-archive",
    "doc": "application/msword", "xls": "application/vnd.ms-excel",
    "ppt": "application/vnd.ms-powerpoint",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "odt": "application/vnd.oasis.opendocument.text", "epub": "application/epub+zip",
    "rss": "application/rss+xml", "atom": "application/atom+xml", "xhtml": "application/xhtml+xml",
    "bin": "application/octet-stream", "exe": "application/octet-stream",
    "iso": "application/octet-stream", "dmg": "application/octet-stream",
    "deb": "application/vnd.debian.binary-package", "apk": "application/vnd.android.package-archive",
    # images
    "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
    "webp": "image/webp", "avif": "image/avif", "svg": "image/svg+xml", "svgz": "image/svg+xml",
    "ico": "image/x-icon", "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff",
    # fonts
    "woff": "font/woff", "woff2": "font/woff2", "ttf": "font/ttf", "otf": "font/otf",
    "eot": "application/vnd.ms-fontobject",
    # audio / video
    "mp3": "audio/mpeg", "ogg": "audio/ogg", "oga": "audio/ogg", "m4a": "audio/mp4",
    "wav": "audio/wav", "flac": "audio/flac", "aac": "audio/aac", "opus": "audio/opus",
    "mid": "audio/midi", "midi": "audio/midi",
    "mp4": "video/mp4", "m4v": "video/mp4", "webm": "video/webm", "ogv": "video/ogg",
    "mov": "video/quicktime", "avi": "video/x-msvideo", "mkv": "video/x-matroska",
    "mpeg": "video/mpeg", "mpg": "video/mpeg", "3gp": "video/3gpp", "flv": "video/x-flv",
    "wmv": "video/x-ms-wmv", "ts": "video/mp2t", "m3u8": "application/vnd.apple.mpegurl",
}

_COMPRESSIBLE_APP = frozenset({
    "application/json", "application/ld+json", "application/manifest+json", "application/xml",
    "application/rss+xml", "application/atom+xml", "application/xhtml+xml", "application/wasm",
    "application/rtf", "application/vnd.apple.mpegurl", "image/svg+xml", "image/x-icon",
    "image/bmp", "font/ttf", "font/otf", "application/vnd.ms-fontobject",
})


def compressible(mime: str) -> bool:
    """Worth gzipping on the fly (text, JSON, XML, SVG...); never already-compressed media."""
    base = mime.split(";", 1)[0].strip().lower()
    return base.startswith("text/") or base in _COMPRESSIBLE_APP


def _with_charset(mime: str) -> str:
    if "charset" not in mime and (mime.startswith("text/") or mime in (
            "application/json", "application/javascript", "application/xml")):
        return mime + "; charset=utf-8"
    return mime


class MimeTable:
    """Extension → Content-Type, with per-location overrides and a default."""

    def __init__(self, overrides: Mapping[str, str] | None = None,
                 default: str = "application/octet-stream") -> None:
        types = dict(MIME_TYPES)
        for ext, mime in (overrides or {}).items():
            types[ext.lower().lstrip(".")] = mime
        self.types = {ext: _with_charset(mime) for ext, mime in types.items()}
        self.default = _with_charset(default)

    def __call__(self, name: str) -> str:
        """The Content-Type for a file name; text types say charset=utf-8."""
        base = name.rsplit("/", 1)[-1]
        ext = base.rsplit(".", 1)[1].lower() if "." in base.lstrip(".") else ""
        return self.types.get(ext, self.default)
