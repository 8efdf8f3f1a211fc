"""The search page: one right-to-left Hebrew page, plain HTML and a small script, no build step."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

bp = Blueprint("web", __name__, static_folder="static", template_folder="templates")


@bp.get("/")
def index():
    settings = current_app.extensions["memfit.settings"]
    return render_template("index.html", semantic_enabled=settings.enable_semantic_search)
