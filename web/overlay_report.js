// A-STAR Attention Overlay shows its pictures in the node as any preview node does (ComfyUI draws the
// "images" of a node's UI output); this adds its text report below them, read-only, once the node has run.
// Not saved with the workflow and not sent with prompts: the report is the node's output, not a setting.
import { app } from "../../scripts/app.js";

const NODE = "AStarAttentionOverlay";
const WIDGET = "report_text";

function reportWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET);
  if (existing) return existing;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.spellcheck = false;
  area.style.cssText = "width:100%;min-height:80px;font:10px monospace;white-space:pre;overflow:auto;";
  const widget = node.addDOMWidget(WIDGET, "astar_report", area, {
    getValue: () => area.value,
    setValue: (value) => { area.value = value; },
    serialize: false,
  });
  widget.serialize = false;
  return widget;
}

app.registerExtension({
  name: "AStar.AttentionOverlayReport",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const text = [].concat(output?.text ?? []).join("\n");
      if (text) reportWidget(this).value = text;
    };
  },
});
