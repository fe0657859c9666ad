"""The library's verbs, one module per part of the library: each adds a verb's arguments (``<verb>_args``) and
runs it (``cmd_<verb>``): parse, call one function, print a table. The applications carry their own verbs
(``textok.apps.*.commands``); ``textok.cli`` holds the table of all of them."""
