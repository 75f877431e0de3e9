"""Operating the gateway: the admin REST API (`api`), its command line (`cli`), the live per-tenant
statistics (`stats`) and the web console (`console/`) that draws them."""
