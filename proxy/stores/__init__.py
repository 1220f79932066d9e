"""Where recordings live: the Store protocol and one module per kind of store."""
