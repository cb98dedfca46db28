window.saeMap && window.saeMap.pointClicked(index);
