"""The ``deme`` commands, one module each: thin orchestrators over the library packages.

Config commands (``--config=FILE --workdir=DIR``) define ``run(config,
workdir)``; the others define ``add_arguments(parser)`` and ``run(args)``.
Commands never import each other: what two of them need lives in a library
package.
"""
