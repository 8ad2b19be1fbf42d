"""The documentation's configuration page, written from the option table.

    python -m iw_relay.options > docs/configuration.rst

The table (`iw_relay.config.OPTIONS`) is the only place an option's default and help are
written; a test checks that the committed page is what this prints.
"""

from __future__ import annotations

import sys
import textwrap

from iw_relay.config import OPTIONS, Option

_HEAD = """\
Configuration
=============

.. This page is generated from the option table in iw_relay/config.py by
   ``python -m iw_relay.options > docs/configuration.rst``: edit the table, not this page.

Every setting is an option of ``twistd iwrelay`` (and of ``twist iwrelay``), and may also
be given in the environment as ``IWRELAY_<NAME>``: upper case, dashes as underscores, so
``--rate-limit 200`` is ``IWRELAY_RATE_LIMIT=200``. Where both are given, the command line
wins. Run ``twistd iwrelay --help`` for the same list as this page.

- A repeatable option is given once per value on the command line
  (``--allowed-origin https://a.example --allowed-origin https://b.example``); in the
  environment it takes several values separated by spaces
  (``IWRELAY_ALLOWED_ORIGIN="https://a.example https://b.example"``). The repeatable
  options are
  {repeatable}.
- A flag takes no value on the command line (``--demo``); in the environment it is
  ``1``, ``true``, ``yes`` or ``on`` (or ``0``, ``false``, ``no``, ``off``).
- The original relay's variables are honoured where the ``IWRELAY_`` ones are unset:
  ``PORT`` (a TCP port number, meaning ``--port tcp:$PORT``), ``LOG_LEVEL``, and
  ``NODE_ENV=production`` (meaning ``--log-format json``).
- A bad value stops the relay before it listens, with one line naming the option or
  the variable that holds it, and a non-zero exit status; so does an endpoint that does
  not parse, or a TLS file that cannot be read.
- When the relay is embedded (:doc:`embedding`), the same settings are the fields of
  ``iw_relay.RelayConfig``, each named below, with durations in seconds and sizes in
  bytes.

Values
------

DURATION
    A number of seconds (``90``, ``1.5``), or a number with ``ms``, ``s``, ``m``, ``h``
    or ``d``: ``500ms``, ``30s``, ``10m``, ``24h``, ``1d``.
SIZE
    A number of bytes, or a number with ``KiB``, ``MiB`` or ``GiB``: ``65536``,
    ``64KiB``, ``1MiB``.
N
    A whole number. Where the option says so, ``0`` means unlimited.
ENDPOINT
    A Twisted server endpoint string: ``tcp:3000``, ``tcp:3000:interface=127.0.0.1``,
    ``tcp6:3000``, ``ssl:443:privateKey=key.pem:certKey=cert.pem``,
    ``tls:/etc/iwrelay/certs:port=443``, ``haproxy:tcp:3000`` (PROXY protocol), or
    ``unix:/run/iwrelay.sock``. TLS endpoints are described in :doc:`operations`.

Options
-------

"""


def _literal(text: str) -> str:
    return f"``{text}``"


def option_entry(option: Option) -> str:
    """One option as a Sphinx ``option`` directive with its default and variable."""
    signature = f"--{option.name}" + (f" {option.metavar}" if option.metavar else "")
    if option.shown_default is not None:
        default = option.shown_default
    else:
        default = _literal(option.default) if option.default is not None else (
            option.default_text)
    fields = [f":Default: {default}", f":Environment: {_literal(option.env)}",
              f":RelayConfig: {_literal(option.field)}"]
    if option.kind == "list":
        fields.append(":Repeatable: yes; several values separated by spaces in the "
                      "environment")
    elif option.kind == "flag":
        fields.append(":Flag: no value; ``1`` or ``0`` in the environment")
    body = [*textwrap.wrap(option.help, 85, break_long_words=False, break_on_hyphens=False),
            "", *fields]
    return f".. option:: {signature}\n\n" + "".join(
        f"   {line}\n" if line else "\n" for line in body)


def configuration_page() -> str:
    repeatable = ", ".join(_literal(f"--{o.name}") for o in OPTIONS if o.kind == "list")
    return _HEAD.format(repeatable=repeatable) + "\n".join(
        option_entry(option) for option in OPTIONS)


def main() -> None:
    sys.stdout.write(configuration_page())


if __name__ == "__main__":
    main()
