"""Recipes in the page: save the session's edits and sampling as a file, load one, copy a link."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence

import panel as pn

from build_map.bundle.read import Bundle
from build_map.steering.links import recipe_to_query
from build_map.steering.recipes import RecipeError, load_recipe, make_recipe
from build_map.steering.requests import Edit, SamplingConfig, SteeringLimits
from explorer.ui.html import CSS, notice

Settings = tuple[list[Edit], float, SamplingConfig]
"""The session's edits, global multiplier and sampling."""


class RecipePanel:
    """Save / load / link of one session's settings, read and written through two callables."""

    def __init__(
        self,
        bundle: Bundle,
        limits: SteeringLimits,
        current: Callable[[], Settings],
        apply: Callable[[Sequence[Edit], float, SamplingConfig | None], None],
    ):
        self.bundle, self.limits = bundle, limits
        self.current, self.apply_settings = current, apply
        self.save = pn.widgets.FileDownload(
            callback=self.recipe_file, filename="recipe.json", label="Save recipe", color="light",
            embed=False, width=120,
        )  # fmt: skip
        self.load = pn.widgets.FileInput(accept=".json", multiple=False, width=200)
        self.load.param.watch(lambda event: self.load_bytes(event.new), "value")
        self.link_button = pn.widgets.Button(label="Copy link", color="light", width=90)
        self.link_button.on_click(lambda event: self.update_link())
        self.link = pn.widgets.TextInput(
            placeholder="Press “Copy link”, then copy this", sizing_mode="stretch_width"
        )
        self.notice = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 5))

    def view(self) -> pn.Column:
        return pn.Column(
            pn.Row(self.save, self.load, sizing_mode="stretch_width"),
            pn.Row(self.link_button, self.link, sizing_mode="stretch_width"),
            self.notice,
            sizing_mode="stretch_width",
            margin=0,
        )

    def current_recipe(self) -> dict:
        return make_recipe(self.bundle, *self.current())

    def recipe_file(self) -> io.StringIO:
        """The recipe file the "Save recipe" button downloads."""
        try:
            text = json.dumps(self.current_recipe(), indent=2) + "\n"
        except RecipeError as exc:
            self.notice.object = notice("error", f"Cannot save: {exc}")
            return io.StringIO("")
        self.notice.object = ""
        return io.StringIO(text)

    def load_bytes(self, data: bytes | None) -> bool:
        """Replace the edits and sampling with a recipe file's; False (notice shown) when refused."""
        if not data:
            return False
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"The file is not JSON ({exc.msg}); load a recipe saved here.") from None
            recipe = load_recipe(parsed, self.bundle, self.limits)
        except (RecipeError, UnicodeDecodeError) as exc:
            self.notice.object = notice("error", f"Recipe not loaded: {exc}")
            return False
        self.apply_settings(recipe.edits, recipe.multiplier, recipe.sampling)
        self.update_link()
        ignored = (
            f" Left out keys this tool does not know: {', '.join(recipe.ignored)}." if recipe.ignored else ""
        )
        self.notice.object = notice(
            "warn" if ignored else "info", f"Loaded a recipe with {len(recipe.edits)} edit(s).{ignored}"
        )
        return True

    def update_link(self) -> str:
        try:
            query = recipe_to_query(self.current_recipe())
        except RecipeError as exc:
            self.notice.object = notice("error", f"No link: {exc}")
            return ""
        base = ""
        location = pn.state.location if pn.state.curdoc is not None else None
        if location is not None and getattr(location, "href", ""):
            base = str(location.href).split("?")[0]
        self.link.value = f"{base}?{query}" if query else base
        return query
