"""Operating the gateway: the admin REST API (`api` builds it from `routes/`, one module per resource, with
`schemas`, `context`, `errors` and `patch`, the merge patches of updates), its command line (`cli`), the live
per-tenant statistics (`stats`) and the web console (`console/`) that draws them and renders the API's
reference."""
