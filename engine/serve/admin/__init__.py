"""The admin pages served by ``polyrec serve`` at ``/`` (engine/serve/admin/routes.py)."""
