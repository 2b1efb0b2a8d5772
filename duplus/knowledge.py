"""An offline knowledge base of the segmentation targets: what the Zeus-style instruction generator says about them.

For every target of ``duplus.vocabulary.REGION_TARGETS`` it holds structured facts from standard adult anatomy and
radiology: location (region, quadrant, level, laterality), relations to neighbouring structures, shape, typical size
and appearance per modality (CT attenuation unenhanced and per contrast phase, MR T1w / T2w signal relative to
muscle and liver, FDG-PET uptake). ``duplus.instructions.KnowledgeBaseGenerator`` renders these into sentences.

The facts are deliberately conservative: numbers are rough ranges that textbooks agree on (and vary with scanner,
contrast protocol and patient), not precise reference values; where no range is well established the fact is
qualitative. They describe typical adults.

Two rules keep them usable as instructions: a fact written as a phrase (the ``*_phrase`` / ``relations`` /
``shape`` text) never names another target (the spleen's facts do not mention the stomach or the left kidney, the
kidneys' facts do not mention the liver), because an instruction must name its own target and no other; and a
lateral target's phrases never use the other side's words. Comparisons with the liver are kept as data
(``MRSignal.vs_liver``) but are not rendered into other targets' instructions for the same reason.

Pure data, importing nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Range = tuple[float, float]            # (low, high); high may be float("inf") for "above low"

CONTRAST_PHASES: tuple[str, ...] = ("unenhanced", "arterial", "portal venous", "delayed")
RELATIVE: tuple[str, ...] = ("lower", "slightly lower", "similar", "slightly higher", "higher")
SIGNAL_LEVELS: tuple[str, ...] = ("low", "low to intermediate", "intermediate", "intermediate to high", "high")


@dataclass(frozen=True)
class Location:
    """Where a target lies: body region, quadrant / compartment, vertebral or anatomical level, side."""

    region: str                       # "abdomen" | "head_neck" (duplus.vocabulary.REGIONS)
    quadrant: str                     # a noun phrase after "lies in": "the right upper quadrant"
    level: str                        # a phrase after "lies": "at roughly the T12 to L3 vertebral levels"
    compartment: str                  # a phrase after "is": "retroperitoneal", "in the deep cervical fat"
    laterality: str | None = None     # "left" | "right" for a lateral target; None for midline / either side
    laterality_phrase: str = ""       # a verb phrase about the side, for a lateral (or usually one-sided) target


@dataclass(frozen=True)
class SizeFact:
    """One typical adult dimension: ``dimension`` (a noun phrase) spans ``range_mm``; ``note`` is a verb phrase."""

    dimension: str
    range_mm: Range
    note: str = ""


@dataclass(frozen=True)
class Size:
    facts: tuple[SizeFact, ...]
    craniocaudal_mm: Range | None = None   # extent along the scan axis, for "spans about N slices"; None: not given
    sex_phrase: dict[str, str] = field(default_factory=dict)   # "M" / "F" -> verb phrase
    older_adult_phrase: str = ""     # verb phrase for patients of 65 years and older
    child_phrase: str = "is smaller in a child than these adult ranges"


@dataclass(frozen=True)
class CTAppearance:
    """Attenuation before contrast and enhancement per phase; each ``*_phrase`` is a verb phrase that says
    "attenuation", "HU" or "enhanc..."; ``phase_hu`` only where a range is well established."""

    unenhanced_hu: Range | None
    unenhanced_phrase: str
    phase_phrase: dict[str, str]               # "arterial" / "portal venous" / "delayed" -> verb phrase
    phase_hu: dict[str, Range] = field(default_factory=dict)
    any_phase_phrase: str = ""                 # phase unknown: a phrase true in every phase


@dataclass(frozen=True)
class MRSignal:
    """Signal on one weighting, relative to skeletal muscle and to liver (None: not well established)."""

    level: str                      # SIGNAL_LEVELS
    vs_muscle: str | None
    vs_liver: str | None
    note: str = ""                  # a verb phrase that says "signal"


@dataclass(frozen=True)
class PETUptake:
    """FDG uptake: physiological (normal tissue) and pathological (disease); phrases say "uptake"."""

    physiological: str              # verb phrase
    suv_physiological: Range | None = None
    suv_kind: str = "SUVmean"
    pathological: str = ""          # verb phrase
    suv_pathological: Range | None = None
    suv_pathological_kind: str = "SUVmax"


@dataclass(frozen=True)
class TargetFacts:
    target: str                     # canonical target (duplus.vocabulary.TARGET_SYNONYMS)
    names: tuple[str, ...]          # subject noun phrases for sentences, each containing a synonym of the target
    location: Location
    relations: tuple[str, ...]      # verb phrases about neighbouring (non-target) structures
    shape: tuple[str, ...]          # verb phrases
    size: Size
    ct: CTAppearance
    mr_t1: MRSignal
    mr_t2: MRSignal
    pet: PETUptake
    lesion: bool = False            # a disease target (tumour, metastatic node) rather than a normal organ


# what both kidneys share (shape, size, appearance); each keeps its own names, location and relations
_KIDNEY_FACTS = dict(
    shape=("is bean-shaped with a medial hilum, an outer cortex and inner medullary pyramids",
           "is a bean-shaped organ whose long axis tilts, upper pole more medial"),
    size=Size(facts=(SizeFact("length", (100, 130), "is about 5 to 7 cm wide"),),
              craniocaudal_mm=(100, 130),
              older_adult_phrase="often has a thinner cortex and slightly smaller size in older adults"),
    ct=CTAppearance(
        unenhanced_hu=(25, 45),
        unenhanced_phrase="has soft-tissue attenuation around the darker renal sinus fat",
        phase_phrase={"arterial": "shows corticomedullary enhancement: bright cortex, darker medulla",
                      "portal venous": "enhances strongly, the corticomedullary difference fading to a uniform nephrogram",
                      "delayed": "shows fading parenchymal enhancement and dense contrast in the collecting system"},
        any_phase_phrase="enhances strongly, cortex first, then uniformly, then excretes contrast"),
    mr_t1=MRSignal(level="low to intermediate", vs_muscle=None, vs_liver="lower",
                   note="shows T1 signal with the cortex brighter than the medulla"),
    mr_t2=MRSignal(level="high", vs_muscle="higher", vs_liver="higher",
                   note="shows high T2 signal, the medulla brighter than the cortex"),
    pet=PETUptake(physiological="shows moderate parenchymal uptake with intense urinary FDG activity in the "
                                "collecting system",
                  pathological="has excreted tracer that can hide or mimic renal lesions; focal uptake outside "
                               "the collecting system is suspicious"),
)


KNOWLEDGE: dict[str, TargetFacts] = {
    "liver": TargetFacts(
        target="liver",
        names=("the liver", "the liver parenchyma"),
        location=Location(region="abdomen", quadrant="the right upper quadrant, reaching across the midline",
                          level="just under the right hemidiaphragm, largely behind the lower ribs",
                          compartment="intraperitoneal"),
        relations=("lies under the right hemidiaphragm with the gallbladder on its undersurface",
                   "wraps around the inferior vena cava and receives the portal vein at the porta hepatis",
                   "sits above the hepatic flexure of the colon and the duodenum"),
        shape=("is the largest solid abdominal organ, wedge-shaped with a smooth convex upper surface",
               "is a large wedge-shaped organ with right, left and caudate lobes"),
        size=Size(facts=(SizeFact("craniocaudal span in the midclavicular line", (100, 160),
                                  "is enlarged when its span is well above 16 cm"),),
                  craniocaudal_mm=None,
                  sex_phrase={"M": "is on average slightly larger in men", "F": "is on average slightly smaller in women"}),
        ct=CTAppearance(
            unenhanced_hu=(45, 65),
            unenhanced_phrase="has homogeneous attenuation slightly above that of blood, lower when fatty",
            phase_phrase={"arterial": "shows only mild parenchymal enhancement while the hepatic arteries are bright",
                          "portal venous": "enhances strongly and homogeneously, with opacified portal and hepatic veins",
                          "delayed": "keeps homogeneous enhancement that slowly fades"},
            phase_hu={"portal venous": (80, 130)},
            any_phase_phrase="has homogeneous attenuation and enhances most in the portal venous phase"),
        mr_t1=MRSignal(level="intermediate", vs_muscle="slightly higher", vs_liver=None,
                       note="shows homogeneous T1 signal that drops on opposed-phase images when fatty"),
        mr_t2=MRSignal(level="low", vs_muscle="slightly higher", vs_liver=None,
                       note="shows low, homogeneous T2 signal, darker than most abdominal organs"),
        pet=PETUptake(physiological="shows moderate, homogeneous physiological FDG uptake",
                      suv_physiological=(1.5, 3.0), suv_kind="SUVmean",
                      pathological="serves as the background for reading uptake, metastases showing as focal uptake above it"),
    ),
    "spleen": TargetFacts(
        target="spleen",
        names=("the spleen", "the splenic parenchyma"),
        location=Location(region="abdomen", quadrant="the left upper quadrant, posterolaterally",
                          level="along the 9th to 11th ribs", compartment="intraperitoneal"),
        relations=("lies under the left hemidiaphragm, protected by the lower left ribs",
                   "sits above the splenic flexure of the colon, with its vessels entering at the hilum"),
        shape=("is crescent- or bean-shaped, with a smooth convex outer surface against the diaphragm",
               "is an oval, soft organ with a concave hilum facing medially"),
        size=Size(facts=(SizeFact("length", (80, 130), "is enlarged (splenomegaly) when longer than about 13 cm"),),
                  craniocaudal_mm=(80, 130),
                  sex_phrase={"M": "is on average slightly larger in men", "F": "is on average slightly smaller in women"},
                  older_adult_phrase="tends to shrink slightly with age"),
        ct=CTAppearance(
            unenhanced_hu=(35, 55),
            unenhanced_phrase="has homogeneous soft-tissue attenuation",
            phase_phrase={"arterial": "shows normal heterogeneous, banded (arciform) enhancement in this phase",
                          "portal venous": "enhances homogeneously once the arterial banding has evened out",
                          "delayed": "shows homogeneous enhancement that slowly fades"},
            any_phase_phrase="enhances homogeneously except for normal arciform banding in the arterial phase"),
        mr_t1=MRSignal(level="low", vs_muscle=None, vs_liver="lower",
                       note="shows low, homogeneous T1 signal"),
        mr_t2=MRSignal(level="high", vs_muscle="higher", vs_liver="higher",
                       note="shows high, homogeneous T2 signal"),
        pet=PETUptake(physiological="shows low to mild, diffuse physiological FDG uptake",
                      suv_physiological=(1.0, 2.5), suv_kind="SUVmean",
                      pathological="shows diffusely raised uptake with marrow activation or lymphoma, focal uptake "
                                   "with deposits"),
    ),
    "left kidney": TargetFacts(
        target="left kidney",
        names=("the left kidney", "the left renal parenchyma"),
        location=Location(region="abdomen", quadrant="the left upper quadrant and left flank, beside the spine",
                          level="at roughly the T12 to L3 vertebral levels", compartment="retroperitoneal",
                          laterality="left",
                          laterality_phrase="usually sits slightly higher than its counterpart, with a longer renal vein"),
        relations=("lies lateral to the psoas muscle with the left adrenal gland above its upper pole",
                   "sits in the perirenal fat of the retroperitoneum, behind the descending colon",
                   "has its hilum facing medially, where the renal vessels and pelvis enter"),
        **_KIDNEY_FACTS,
    ),
    "right kidney": TargetFacts(
        target="right kidney",
        names=("the right kidney", "the right renal parenchyma"),
        location=Location(region="abdomen", quadrant="the right upper quadrant and right flank, beside the spine",
                          level="at roughly the T12 to L3 vertebral levels, a little lower than its counterpart",
                          compartment="retroperitoneal", laterality="right",
                          laterality_phrase="usually sits slightly lower than its counterpart"),
        relations=("lies lateral to the psoas muscle with the right adrenal gland above its upper pole",
                   "sits in the perirenal fat behind the duodenum and the hepatic flexure of the colon",
                   "has its hilum facing medially, where the renal vessels and pelvis enter"),
        **_KIDNEY_FACTS,
    ),
    "aorta": TargetFacts(
        target="aorta",
        names=("the aorta", "the abdominal aorta"),
        location=Location(region="abdomen", quadrant="the midline, slightly left of centre, in front of the spine",
                          level="between the diaphragmatic hiatus at about T12 and its bifurcation at about L4",
                          compartment="retroperitoneal"),
        relations=("runs down in front of the vertebral bodies with the inferior vena cava on its right",
                   "gives off the coeliac trunk, the superior mesenteric and the renal arteries",
                   "divides into the common iliac arteries at about the level of L4"),
        shape=("is a round tube in cross-section that narrows slightly as it descends",
               "is a tubular artery, round on axial slices, often with a calcified wall"),
        size=Size(facts=(SizeFact("diameter", (15, 25), "is aneurysmal at a diameter of 3 cm or more"),),
                  craniocaudal_mm=None,
                  sex_phrase={"M": "is on average a little wider in men", "F": "is on average a little narrower in women"},
                  older_adult_phrase="widens slightly and its wall calcifies with age"),
        ct=CTAppearance(
            unenhanced_hu=(30, 50),
            unenhanced_phrase="has the attenuation of blood, with any wall calcification bright",
            phase_phrase={"arterial": "shows dense luminal enhancement, brightest of all vessels in this phase",
                          "portal venous": "shows moderate luminal enhancement, less than in the arterial phase",
                          "delayed": "shows faint blood-pool enhancement like the veins"},
            phase_hu={"arterial": (200, float("inf"))},
            any_phase_phrase="has a lumen whose enhancement peaks in the arterial phase"),
        mr_t1=MRSignal(level="low", vs_muscle=None, vs_liver=None,
                       note="shows a dark flow void on spin-echo T1 images, while gradient-echo signal is bright"),
        mr_t2=MRSignal(level="low", vs_muscle=None, vs_liver=None,
                       note="shows a dark flow void on spin-echo T2 images; slow flow raises the signal"),
        pet=PETUptake(physiological="shows low, blood-pool FDG uptake",
                      suv_physiological=(1.0, 2.0), suv_kind="SUVmean",
                      pathological="shows wall uptake with vasculitis or active atherosclerosis"),
    ),
    "pancreas": TargetFacts(
        target="pancreas",
        names=("the pancreas", "the pancreatic gland", "the pancreatic parenchyma"),
        location=Location(region="abdomen", quadrant="the epigastrium, crossing the midline from right to left",
                          level="at roughly the L1 to L2 vertebral levels",
                          compartment="retroperitoneal, in the anterior pararenal space"),
        relations=("has its head in the C-loop of the duodenum and its neck in front of the superior mesenteric vessels",
                   "lies behind the lesser sac, with the splenic vein along its back",
                   "carries the common bile duct through its head"),
        shape=("is an elongated, lobulated gland with a head, neck, body and tail",
               "is a long, thin, lobulated gland lying obliquely, its tail higher than its head"),
        size=Size(facts=(SizeFact("anteroposterior thickness of the head", (20, 30),
                                  "is thinner in the body and tail (up to about 2.5 and 2 cm)"),
                         SizeFact("length", (120, 150), "")),
                  craniocaudal_mm=None,
                  older_adult_phrase="becomes thinner and more lobulated with fat in older adults"),
        ct=CTAppearance(
            unenhanced_hu=(30, 50),
            unenhanced_phrase="has soft-tissue attenuation, lowered by fatty replacement",
            phase_phrase={"arterial": "shows its peak, homogeneous enhancement (pancreatic phase)",
                          "portal venous": "still enhances homogeneously, a little less than in the pancreatic phase",
                          "delayed": "shows gradually fading homogeneous enhancement"},
            any_phase_phrase="enhances homogeneously, most in the late arterial (pancreatic) phase"),
        mr_t1=MRSignal(level="high", vs_muscle="higher", vs_liver="higher",
                       note="shows high T1 signal, among the brightest of abdominal organs with fat suppression"),
        mr_t2=MRSignal(level="low to intermediate", vs_muscle="similar", vs_liver="similar",
                       note="shows low to intermediate T2 signal, with a bright duct when dilated"),
        pet=PETUptake(physiological="shows low physiological FDG uptake, close to background",
                      pathological="shows focal uptake with a tumour, diffuse uptake with pancreatitis"),
    ),
    "stomach": TargetFacts(
        target="stomach",
        names=("the stomach",),
        location=Location(region="abdomen", quadrant="the left upper quadrant and epigastrium",
                          level="between the gastro-oesophageal junction at about T11 and the pylorus near L1",
                          compartment="intraperitoneal"),
        relations=("continues from the oesophagus at the cardia to the duodenum at the pylorus",
                   "lies under the left hemidiaphragm, in front of the lesser sac and above the transverse colon"),
        shape=("is a J-shaped hollow organ with fundus, body, antrum and pylorus",
               "is a hollow, J-shaped organ with rugal folds whose shape changes with filling"),
        size=Size(facts=(SizeFact("wall thickness when distended", (2, 5),
                                  "varies in size with filling; the collapsed antrum looks thicker"),),
                  craniocaudal_mm=None),
        ct=CTAppearance(
            unenhanced_hu=None,
            unenhanced_phrase="has a wall of soft-tissue attenuation around air, fluid or food",
            phase_phrase={"arterial": "shows bright mucosal enhancement of the inner wall around its contents",
                          "portal venous": "shows a layered, enhancing wall around air, fluid or food",
                          "delayed": "shows fading wall enhancement around its contents"},
            any_phase_phrase="has an enhancing soft-tissue wall around air, fluid or food"),
        mr_t1=MRSignal(level="intermediate", vs_muscle="similar", vs_liver=None,
                       note="shows intermediate wall signal on T1 with dark fluid and air in the lumen"),
        mr_t2=MRSignal(level="intermediate", vs_muscle=None, vs_liver=None,
                       note="shows a darker wall on T2 around bright fluid contents, with air as a signal void"),
        pet=PETUptake(physiological="shows variable, mild to moderate physiological wall uptake, often most at "
                                    "the fundus",
                      pathological="shows focal intense uptake or wall thickening that is suspicious for tumour"),
    ),
    "primary tumour": TargetFacts(
        target="primary tumour",
        names=("the primary tumour", "the primary tumor", "the primary gross tumour volume"),
        location=Location(region="head_neck",
                          quadrant="the oropharynx: palatine tonsil, base of tongue, soft palate or pharyngeal wall",
                          level="at roughly the level of the C2 to C3 vertebrae", compartment="mucosal in origin",
                          laterality=None,
                          laterality_phrase="is usually one-sided in the tonsil, while a base-of-tongue tumour may "
                                            "cross the midline"),
        relations=("grows from the mucosa and may invade the parapharyngeal fat or the tongue muscles",
                   "distorts the airway outline and the symmetry of the pharyngeal wall"),
        shape=("is an irregular, infiltrative or exophytic mass, sometimes ulcerated",
               "is an asymmetric mass with ill-defined margins"),
        size=Size(facts=(SizeFact("greatest dimension", (10, 60),
                                  "is staged T1 up to 2 cm, T2 2 to 4 cm and T3 above 4 cm"),),
                  craniocaudal_mm=(10, 60), child_phrase=""),
        ct=CTAppearance(
            unenhanced_hu=None,
            unenhanced_phrase="has soft-tissue attenuation close to muscle and is hard to separate unenhanced",
            phase_phrase={ph: "shows moderate, often heterogeneous enhancement with low-attenuation necrosis "
                              "when large" for ph in ("arterial", "portal venous", "delayed")},
            any_phase_phrase="shows moderate, heterogeneous enhancement after contrast"),
        mr_t1=MRSignal(level="intermediate", vs_muscle="similar", vs_liver=None,
                       note="shows intermediate T1 signal and enhances after gadolinium"),
        mr_t2=MRSignal(level="intermediate to high", vs_muscle="higher", vs_liver=None,
                       note="shows intermediate to high T2 signal, heterogeneous where necrotic"),
        pet=PETUptake(physiological="shows intense FDG uptake",
                      suv_physiological=None,
                      pathological="shows intense, asymmetric FDG uptake; normal tonsillar tissue takes up FDG too",
                      suv_pathological=(5, float("inf")), suv_pathological_kind="SUVmax"),
        lesion=True,
    ),
    "lymph node": TargetFacts(
        target="lymph node",
        names=("the metastatic lymph node", "a metastatic lymph node", "the lymph node", "each nodal metastasis"),
        location=Location(region="head_neck", quadrant="cervical levels I to V, most often level II",
                          level="along the upper and middle jugular chain, or in the retropharyngeal space",
                          compartment="in the deep cervical fat", laterality=None,
                          laterality_phrase="is most often on the side of the primary site, sometimes on both sides"),
        relations=("lies along the internal jugular vein, deep to the sternocleidomastoid muscle",
                   "sits in the fat beside the carotid sheath"),
        shape=("is round rather than oval, having lost its fatty hilum",
               "is round, sometimes necrotic or cystic, with irregular margins when it breaks its capsule"),
        size=Size(facts=(SizeFact("short axis", (5, 30),
                                  "is suspicious above about 10 mm short axis, though small nodes can be involved"),),
                  craniocaudal_mm=(5, 30), child_phrase=""),
        ct=CTAppearance(
            unenhanced_hu=None,
            unenhanced_phrase="has soft-tissue attenuation near muscle, lower in a necrotic centre",
            phase_phrase={ph: "shows rim enhancement around a low-attenuation necrotic centre, or homogeneous "
                              "enhancement" for ph in ("arterial", "portal venous", "delayed")},
            any_phase_phrase="shows rim enhancement around a low-attenuation necrotic or cystic centre"),
        mr_t1=MRSignal(level="intermediate", vs_muscle="similar", vs_liver=None,
                       note="shows intermediate T1 signal with rim enhancement after gadolinium"),
        mr_t2=MRSignal(level="intermediate to high", vs_muscle="higher", vs_liver=None,
                       note="shows intermediate to high T2 signal, very bright where necrotic or cystic"),
        pet=PETUptake(physiological="shows FDG uptake above the blood-pool background",
                      pathological="shows focal FDG uptake, underestimated in small nodes by partial volume; "
                                   "inflamed nodes take up FDG too",
                      suv_pathological=(2.5, float("inf")), suv_pathological_kind="SUVmax"),
        lesion=True,
    ),
}
