"""Downloads of the retrieval experiments' files for download_itm.py, in the Python 3
standard library only (they run before anything is installed): the HTTP transfer with its
retries (transfer), archives (archives), the manifest of what was written (manifest) and
what the releases hold (release)."""


class DownloadError(Exception):
    """A download that cannot succeed as configured; the message is one line for the user."""
