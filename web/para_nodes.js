// comfyui-para: front-end help for Train PaRa's node text.
//
// A node's progress text (where every PaRa node writes its result) gets only about two lines when the node
// also shows an image: the front end splits the node's free height between the text and the image. Train
// PaRa with preview_every shows both, so after a run with a preview the node is made tall enough for the
// whole summary (never smaller than the user made it). Works on front ends 1.35.9 and 1.49.6.
import { app } from "../../scripts/app.js";

const EXTRA_HEIGHT = 240; // px beyond the node's minimum size: the text gets half, the image the other half

app.registerExtension({
  name: "comfyui-para.TrainPreviewText",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "PaRaTrainer") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      if (output?.images?.length) {
        const min = this.computeSize();
        const height = Math.max(this.size[1], min[1] + EXTRA_HEIGHT);
        if (height > this.size[1]) {
          this.setSize([this.size[0], height]);
          this.setDirtyCanvas?.(true, true);
        }
      }
      return result;
    };
  },
});
