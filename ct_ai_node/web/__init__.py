"""The administrator's web app (FastAPI): dashboard, job pages and actions, JSON API,
``/metrics`` and ``/healthz``; served by ``ct-ai-node serve`` (docs/node.md, "Web app")."""
