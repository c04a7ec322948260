"""Where each dataset officially comes from: addresses, archive names, checksums, licence, citation.

Why pinned here: a download is only trusted if it matches what we expect. Where the provider
publishes no checksum and none could be found (all three at the time of writing), `sha256` is None
and the first verified download records its hash in `data/raw/CHECKSUMS`; every later download or
placed archive is then checked against that record (see `vmddpm.data.download`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    archive: str  # file name of the official archive
    urls: tuple[str, ...]  # empty: gated (the user must place the archive)
    size: int | None  # bytes, when known
    sha256: str | None  # when known; else recorded in data/raw/CHECKSUMS on first verified download
    root: str  # top folder of the raw layout inside the archive
    children: tuple[str, ...]  # folders directly inside it: find a renamed root (e.g. a Kaggle copy)
    layout: str  # the official raw layout, for messages
    register_url: str | None  # where to get a gated dataset
    licence: str
    citation: str

    @property
    def gated(self) -> bool:
        return not self.urls


SOURCES: dict[str, Source] = {
    "chestxray": Source(
        name="chestxray",
        archive="ChestXRay2017.zip",
        # Mendeley Data V2 (doi:10.17632/rscbjbr9sj.2), file ChestXRay2017.zip (~1.2 GB)
        urls=(
            "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
            "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded",
        ),
        size=None,
        sha256=None,
        root="chest_xray",
        children=("train", "test"),
        layout="chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg",
        register_url="https://data.mendeley.com/datasets/rscbjbr9sj/2",
        licence="CC BY 4.0",
        citation=(
            "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
            "Images for Classification. Mendeley Data, V2, 2018. doi:10.17632/rscbjbr9sj.2"
        ),
    ),
    "brats2018": Source(
        name="brats2018",
        archive="MICCAI_BraTS_2018_Data_Training.zip",
        urls=(),  # gated behind the CBICA registration
        size=None,
        sha256=None,
        root="MICCAI_BraTS_2018_Data_Training",
        children=("HGG", "LGG"),
        layout="MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz",
        register_url="https://www.med.upenn.edu/sbia/brats2018/registration.html",
        licence="BraTS data-use terms (registration at CBICA); cite the BraTS papers",
        citation=(
            "Menze BH et al. The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS). IEEE TMI "
            "34(10), 2015; Bakas S et al. Advancing The Cancer Genome Atlas glioma MRI collections with "
            "expert segmentation labels and radiomic features. Sci Data 4, 2017; Bakas S et al. "
            "arXiv:1811.02629, 2018"
        ),
    ),
    "acdc": Source(
        name="acdc",
        archive="ACDC.zip",
        urls=(
            "https://humanheart-project.creatis.insa-lyon.fr/database/api/v1/folder/"
            "637218e573e9f0047faa00fc/download",
        ),
        size=None,
        sha256=None,
        root="database",
        children=("training", "testing"),
        layout="database/{training,testing}/patientNNN/{Info.cfg, patientNNN_4d.nii.gz, "
        "patientNNN_frameXX.nii.gz, patientNNN_frameXX_gt.nii.gz}",
        register_url="https://humanheart-project.creatis.insa-lyon.fr/database/",
        licence="CC BY-NC-SA 4.0",
        citation=(
            "Bernard O et al. Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures "
            "Segmentation and Diagnosis: Is the Problem Solved? IEEE TMI 37(11), 2018"
        ),
    ),
}


def source(name: str) -> Source:
    return SOURCES[name]
