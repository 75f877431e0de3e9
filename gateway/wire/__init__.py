"""The hand-written wire protocols: the HTTP/1.1 server (`httpserver`), the HTTP/1.1 client to backends
(`httpclient`) and the pipelined Redis client of the quota path (`resp`), and the moving deadline all three
time their peers with (`deadline`).

This package imports nothing else of the gateway: it speaks bytes on sockets, with its own errors, and the
layers above translate them at their seam. Each module is imported where it is used.
"""
