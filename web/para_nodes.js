// comfyui-para: front-end help for the pack's nodes (front ends 1.35.9 and 1.49.6).
//
// 1. Train PaRa's node text beside its preview.
// A node's progress text (where every PaRa node writes its result) gets only about two lines when the node
// also shows an image: the front end splits the node's free height between the text and the image. Train
// PaRa with preview_every shows both, so after a run with a preview the node is made tall enough for the
// whole summary (never smaller than the user made it).
//
// 2. The `para` model folder for Load PaRa and Load PaRa File. Front end 1.49.6 knows which folder a core
// loader's file belongs to from a built-in table (its "modelToNode" store) and lists a missing file of any
// other node under "Unknown" in its Errors panel. Workflows can name a folder only together with a download
// URL (properties.models entries without a URL fail the workflow schema of both front ends), and a user's
// own PaRa file has none. So the pack adds its two loaders to that table, where the front end has one: a
// missing PaRa file is then listed under "para" (and the model library opens .safetensors files of the para
// folder in Load PaRa). Front ends without the table are left as they are.
import { app } from "../../scripts/app.js";

const PARA_LOADERS = [["PaRaLoader", "para_name"], ["PaRaLoadFile", "para_name"]];

function modelToNodeStore() {
  const root = document.querySelector("[data-v-app]") || document.getElementById("vue-app");
  const pinia = root?.__vue_app__?.config?.globalProperties?.$pinia;
  const store = pinia?._s?.get?.("modelToNode");
  return typeof store?.quickRegister === "function" && typeof store?.getCategoryForNodeType === "function" ? store : null;
}

const EXTRA_HEIGHT = 240; // px beyond the node's minimum size: the text gets half, the image the other half

app.registerExtension({
  name: "comfyui-para.ParaModelFolder",
  setup() {
    const store = modelToNodeStore();
    if (!store) return;
    for (const [nodeType, widget] of PARA_LOADERS) {
      if (!store.getCategoryForNodeType(nodeType)) store.quickRegister("para", nodeType, widget);
    }
  },
});

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
