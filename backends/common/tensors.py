"""Names shared by the builder (which wires the ensemble) and the Python-backend models."""

CONFIG_PARAMETER = "config"  # the model-config parameter holding each Python model's JSON settings

IMAGE = "IMAGE"
PREPROCESSED = "PREPROCESSED"
TRANSFORM = "TRANSFORM"
RAW_OUTPUT = "RAW_OUTPUT"  # detector -> postprocess, the one output of a one-output format; see raw_outputs

# postprocess -> router
EDGE_BOXES = "EDGE_BOXES"
EDGE_SCORES = "EDGE_SCORES"
EDGE_CLASS_IDS = "EDGE_CLASS_IDS"
EDGE_CLASS_NAMES = "EDGE_CLASS_NAMES"
EDGE_NUM_DETECTIONS = "EDGE_NUM_DETECTIONS"

# router -> client (the ensemble's outputs)
BOXES = "BOXES"
SCORES = "SCORES"
CLASS_IDS = "CLASS_IDS"
CLASS_NAMES = "CLASS_NAMES"
NUM_DETECTIONS = "NUM_DETECTIONS"
SOURCE = "SOURCE"
DEGRADED = "DEGRADED"
# preprocess -> router and client: per image "" (ok) or "image <index>: <error>"; that image has no detections
STATUS = "STATUS"
STAGE = "STAGE"  # cascade -> client: which model answered each image (the cascade's stage names)
# Inside an ensemble, preprocess's STATUS travels as IMAGE_STATUS (and the cascade's stage as IMAGE_STAGE) to the
# router, which outputs STATUS (and STAGE): every output then comes from the last step, so a client may ask for any
# subset of them (Triton's ensemble refuses a request for only outputs of an early step).
IMAGE_STATUS = "IMAGE_STATUS"
IMAGE_STAGE = "IMAGE_STAGE"

DETECTION_OUTPUTS = (BOXES, SCORES, CLASS_IDS, CLASS_NAMES, NUM_DETECTIONS)
EDGE_TO_FINAL = {
    EDGE_BOXES: BOXES,
    EDGE_SCORES: SCORES,
    EDGE_CLASS_IDS: CLASS_IDS,
    EDGE_CLASS_NAMES: CLASS_NAMES,
    EDGE_NUM_DETECTIONS: NUM_DETECTIONS,
}


def raw_outputs(roles: tuple[str, ...]) -> tuple[str, ...]:
    """The ensemble tensors carrying the detector's outputs to postprocess, one per role of the output format
    (formats.OutputFormat.outputs): RAW_OUTPUT for a one-output format, RAW_OUTPUT_<ROLE> for each of several."""
    if len(roles) == 1:
        return (RAW_OUTPUT,)
    return tuple(f"{RAW_OUTPUT}_{role.upper()}" for role in roles)
