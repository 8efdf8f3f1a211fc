"""The search page: one right-to-left Hebrew page, plain HTML and a small script, no build step."""

from __future__ import annotations

from flask import Blueprint, render_template

from .state import get_settings

bp = Blueprint("web", __name__, static_folder="static", template_folder="templates")


@bp.get("/")
def index():
    return render_template("index.html", semantic_enabled=get_settings().enable_semantic_search)
